"""A listed file's fingerprint, taken when INPUT is listed: its size and modification time, and with
`--fingerprint content` the sha256 of its bytes. Rows record it (docs/schema.md); incremental nights compare it
(pipeline/nights.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import BinaryIO

STAT = "stat"  # size and modification time: changed when either differs
CONTENT = "content"  # sha256 of the bytes: for filesystems whose times cannot be trusted; reads every file
FINGERPRINTS = (STAT, CONTENT)
HASH_THREADS = 8  # files read and hashed at once (hashlib releases the GIL; the wait is the storage's)
_CHUNK = 1 << 20


def stat_file(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """(size in bytes, modification time in ns since the epoch) of a file, following symlinks; a broken symlink's
    own; (None, None) when it is gone (its row says why, and a null fingerprint never equals a later one)."""
    for follow in (True, False):
        try:
            status = os.stat(path, follow_symlinks=follow)
            return status.st_size, status.st_mtime_ns
        except OSError:
            continue
    return None, None


def object_mtime_ns(info: dict) -> int | None:
    """The modification time of an object as an fsspec listing describes it (S3's LastModified, GCS's updated,
    Azure's last_modified, or a POSIX-like mtime), in ns since the epoch."""
    for key in ("LastModified", "last_modified", "updated", "mtime", "modified"):
        value = info.get(key)
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            return int(value.timestamp() * 1_000_000) * 1000
        if isinstance(value, (int, float)):
            return int(value * 1e9)
    return None


def sha256_of(open_item: Callable[[str], BinaryIO], item: str) -> str | None:
    """The sha256 of one item's bytes; None when it cannot be read (its row says why)."""
    digest = hashlib.sha256()
    try:
        with open_item(item) as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
    except Exception:
        return None
    return digest.hexdigest()


def hash_all(open_item: Callable[[str], BinaryIO], items: list[str]) -> list[str | None]:
    """sha256 of every item, in order, HASH_THREADS at a time."""
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="hash") as pool:
        return list(pool.map(lambda item: sha256_of(open_item, item), items, chunksize=64))
