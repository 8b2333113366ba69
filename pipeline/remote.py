"""Inputs beyond a local folder: an object-store prefix (any fsspec URL) and a list file of paths or URLs.

Both are sources with the same interface as source.LocalFolder (check, describe, list, open). Objects are fetched
whole with one ranged GET each (never more than max_bytes + 1 bytes); a DataLoader worker keeps up to
`fetch_threads` GETs in flight (fetch_ahead), so the store's latency per request overlaps instead of adding up.
Credentials come from each store's own configuration (for S3: the AWS environment variables and config files,
AWS_ENDPOINT_URL); nothing here reads, logs or stores them.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from pipeline import causes
from pipeline.causes import Unusable
from pipeline.fingerprint import object_mtime_ns, stat_file
from pipeline.read import open_file
from pipeline.source import IMAGE_EXTENSIONS, InputError, Listing, decode_path, encode_path

_logger = logging.getLogger(__name__)

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # a URL (two letters at least: not a Windows drive); a Path
#   collapses '://' into ':/', so this also finds a URL that went through Path
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
ATTEMPTS = 4  # tries of one GET that failed for a reason other than missing or denied (throttling, a reset)
BACKOFF_S = 0.2  # first wait between tries, doubled each time
DEFAULT_FETCH_THREADS = 16  # GETs in flight per decode worker


def is_url(text: str) -> bool:
    return URL.match(text) is not None


def public_url(url: str) -> str:
    """The URL as the run's identity and logs name it: without anything before an '@' in its host part, nor a
    query."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; InputError naming the extra to install when its package is
    missing."""
    import fsspec.core

    protocol = url.split(":", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        extra = EXTRAS.get(protocol)
        fix = f"pip install -e '.[{extra}]'" if extra else "install the fsspec package for this protocol"
        raise InputError(f"reading {protocol}:// URLs needs a package that is not installed ({error}): {fix}") \
            from None
    except ValueError as error:
        raise InputError(f"{public_url(url)}: {error}; pass a local folder or a URL of an fsspec protocol "
                         "(s3://, gs://, az://)") from None


def _check_reachable(url: str) -> None:
    """Refuse (before anything is written) a URL whose store refuses the credentials or has no such bucket/prefix."""
    if urlsplit(url).username is not None or urlsplit(url).query:  # a key, a password or a SAS token: the URL is
        #   saved with the output
        raise InputError(f"{public_url(url)}: the URL holds credentials; remove them and configure them the "
                         "store's own way (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    fs, path = _filesystem(url)
    try:
        fs.invalidate_cache()
        fs.ls(path, detail=False)
    except PermissionError as error:
        raise InputError(f"{public_url(url)}: access denied ({error}): check the credentials (for S3: "
                         "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role; AWS_ENDPOINT_URL "
                         "for an S3-compatible store) and that they may list this bucket") from None
    except FileNotFoundError:
        raise InputError(f"{public_url(url)}: no such bucket or prefix: pass an existing one") from None
    except Exception as error:  # botocore's connection errors, an endpoint that answers nonsense
        raise InputError(f"{public_url(url)}: the store cannot be reached ({type(error).__name__}: {error}): check "
                         "the credentials (for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), the "
                         "endpoint (AWS_ENDPOINT_URL for an S3-compatible store) and the network") from None


class _Fetcher:
    """Whole objects by URL, in this process: one filesystem per protocol and a thread pool that keeps GETs in
    flight. Both are made again in a forked worker (neither survives a fork)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pid = -1

    def _fresh(self) -> None:
        if self.pid != os.getpid():
            self.pid, self.filesystems = os.getpid(), {}
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fetch") if self.threads > 1 else None
            self.pending: OrderedDict[str, Future] = OrderedDict()

    def fetch(self, url: str, max_bytes: int | None) -> bytes:
        """The object's bytes (at most max_bytes + 1 read), or Unusable naming the cause."""
        self._fresh()
        future = self.pending.pop(url, None)
        return future.result() if future is not None else self._get(url, max_bytes)

    def ahead(self, urls: list[str], max_bytes: int | None) -> None:
        """Start fetching these (the items a worker reads next), at most 2 x threads held at once."""
        self._fresh()
        if self.pool is None:
            return
        for url in urls:
            if url not in self.pending:
                self.pending[url] = self.pool.submit(self._get, url, max_bytes)
        while len(self.pending) > 2 * self.threads:  # never read (a worker's items handed to another): dropped
            self.pending.popitem(last=False)[1].cancel()

    def _get(self, url: str, max_bytes: int | None) -> bytes:
        protocol = url.split(":", 1)[0]
        if protocol not in self.filesystems:
            self.filesystems[protocol] = _filesystem(url)[0]
        fs = self.filesystems[protocol]
        path = fs._strip_protocol(url)
        for attempt in range(ATTEMPTS):
            try:
                data = fs.cat_file(path, start=0, end=None if max_bytes is None else max_bytes + 1)
                break
            except FileNotFoundError:
                raise Unusable(causes.VANISHED, "it was listed but is no longer there") from None
            except PermissionError as error:
                raise Unusable(causes.UNREADABLE, f"access denied ({error})") from None
            except Exception as error:  # throttling (SlowDown, 503), a reset connection: retried, then a row
                if attempt == ATTEMPTS - 1:
                    raise Unusable(causes.UNREADABLE, f"{type(error).__name__}: {error} (after {ATTEMPTS} tries)") \
                        from None
                time.sleep(BACKOFF_S * 2**attempt)
        if not data:
            raise Unusable(causes.EMPTY)
        if max_bytes is not None and len(data) > max_bytes:
            raise Unusable(causes.TOO_LARGE, f"more than {max_bytes} bytes")
        return data


@dataclass
class ObjectStore:
    """Every image-named object under a URL prefix (s3://bucket/prefix/, gs://, az://), recursively."""

    url: str
    fetch_threads: int = DEFAULT_FETCH_THREADS
    fetcher: _Fetcher = field(init=False, repr=False)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.fetcher = _Fetcher(self.fetch_threads)

    def check(self) -> None:
        _check_reachable(self.url)

    def describe(self) -> str:
        return public_url(self.url) + "/"

    def list(self) -> Listing:
        self.check()
        fs, root = _filesystem(self.url)
        root = root.rstrip("/")
        found = {path[len(root) + 1:]: info for path, info in fs.find(root, detail=True).items()
                 if path.startswith(root + "/")}
        items = [(encode_path(path), info.get("size"), object_mtime_ns(info), info.get("ETag"))
                 for path, info in found.items()
                 if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS]  # the listing's size and time: free
        if not items:
            raise InputError(f"found 0 images under {self.describe()} ({len(found)} other objects ignored); image "
                             f"extensions are: {' '.join(sorted(IMAGE_EXTENSIONS))} (any case)")
        return Listing.of(items, len(found) - len(items))

    def _url(self, path: str) -> str:
        return f"{self.url}/{decode_path(path)}"

    def fetch_ahead(self, paths: list[str], max_bytes: int | None = None) -> None:
        self.fetcher.ahead([self._url(path) for path in paths], max_bytes)

    def open(self, path: str, max_bytes: int | None = None) -> BinaryIO:
        return io.BytesIO(self.fetcher.fetch(self._url(path), max_bytes))


@dataclass
class ListFile:
    """The items named in a file: a text file (one path or URL a line) or a Parquet or CSV file with a `path` column.
    Each distinct item is listed once, sorted; a row's path is the item as listed. A relative local path is taken
    from the list file's folder."""

    file: Path
    fetch_threads: int = DEFAULT_FETCH_THREADS
    stat_urls: bool = False  # ask the store each URL's size and time when listing (one HEAD each): incremental
    #   nights need them; a local item's are always taken
    fetcher: _Fetcher = field(init=False, repr=False)

    def __post_init__(self):
        self.fetcher = _Fetcher(self.fetch_threads)

    def check(self) -> None:
        """The file readable, and every store its URLs name reachable with these credentials."""
        self.check_stores(self.read())

    def _check_file(self) -> None:
        if not self.file.is_file() or not os.access(self.file, os.R_OK):
            raise InputError(f"--input-list {self.file}: not a readable file; pass a text, Parquet or CSV file of "
                             "paths or URLs")

    def check_stores(self, items: list[str]) -> None:
        """Each store named by a URL item: its package installed, its bucket reachable with these credentials."""
        buckets = sorted({f"{urlsplit(item).scheme}://{urlsplit(item).netloc}" for item in items if is_url(item)})
        for bucket in buckets:
            _check_reachable(bucket)

    def describe(self) -> str:
        return f"list:{self.file.resolve()}"

    def read(self) -> list[str]:
        """The distinct items of the file, sorted."""
        self._check_file()
        suffix = self.file.suffix.lower()
        try:
            if suffix in (".parquet", ".csv"):
                import pyarrow.csv
                import pyarrow.parquet

                table = (pyarrow.parquet.read_table(self.file) if suffix == ".parquet"
                         else pyarrow.csv.read_csv(self.file))
                if "path" not in table.column_names:
                    raise InputError(f"--input-list {self.file} has no `path` column (its columns: "
                                     f"{', '.join(table.column_names)}): export the paths as a column named path")
                items = [str(item) for item in table.column("path").to_pylist() if item not in (None, "")]
            else:
                text = self.file.read_bytes().decode("utf-8", "surrogateescape")
                items = [line.strip() for line in text.splitlines() if line.strip()]
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"--input-list {self.file} cannot be read ({type(error).__name__}: {error}): pass a "
                             "text file (one path a line), or a Parquet or CSV file with a path column") from None
        return sorted(set(items))

    def list(self) -> Listing:
        items = self.read()
        if not items:
            raise InputError(f"--input-list {self.file} names no items: pass a file with one path or URL a line")
        self.check_stores(items)
        urls = [item for item in items if is_url(item)]
        stats = dict(zip(urls, self._stat_urls(urls), strict=True)) if self.stat_urls else {}
        return Listing.of([(encode_path(item), *(stats.get(item, (None, None, None)) if is_url(item)
                                                 else (*stat_file(self._local(item)), None))) for item in items], 0)

    def _stat_urls(self, urls: list[str]) -> list[tuple[int | None, int | None, str | None]]:
        """(size, mtime_ns, ETag) of each URL, fetch_threads requests at a time; Nones for one that is gone."""
        def stat(url: str) -> tuple[int | None, int | None, str | None]:
            try:
                fs, path = _filesystem(url)
                info = fs.info(path)
            except Exception:  # gone or denied: its row says why when it is read
                return None, None, None
            return info.get("size"), object_mtime_ns(info), info.get("ETag")

        with ThreadPoolExecutor(max(1, self.fetch_threads), thread_name_prefix="stat") as pool:
            return list(pool.map(stat, urls))

    def _local(self, item: str) -> Path:
        return self.file.parent / item  # an absolute item stays itself

    def fetch_ahead(self, paths: list[str], max_bytes: int | None = None) -> None:
        self.fetcher.ahead([decode_path(path) for path in paths if is_url(path)], max_bytes)

    def open(self, path: str, max_bytes: int | None = None) -> BinaryIO:
        item = decode_path(path)
        if is_url(item):
            return io.BytesIO(self.fetcher.fetch(item, max_bytes))
        return open_file(self._local(item), max_bytes)
