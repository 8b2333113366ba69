"""The input source: list the work items (sorted image paths) and open one: a local folder here; an object-store
prefix or a list file in pipeline/remote.py, with the same methods (check, describe, list, open). open_source picks
one for a run."""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO

from pipeline import causes
from pipeline.config import Config, Refused
from pipeline.fingerprint import stat_file
from pipeline.read import open_file

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PATH_ENCODING = "utf-8, \\ as \\\\, other bytes as \\xNN"  # how `path` spells a name's bytes (docs/schema.md)
LOGGED_FOLDERS = 20  # folders that cannot be listed: each logged and kept in the plan's facts, up to this many


class InputError(Refused):
    """The input cannot be listed; the message names the fix."""


@dataclass
class Listing:
    paths: list[str]  # image paths relative to the input folder, '/'-separated, encoded (encode_path), sorted
    ignored: int  # files under the folder that are not images by extension
    unlisted: dict[str, int] = field(default_factory=dict)  # folders below the input that could not be listed,
    #   by cause (causes.FOLDER_CAUSES)
    unlisted_paths: list[dict] = field(default_factory=list)  # the first LOGGED_FOLDERS of them: path and error
    sizes: list[int | None] | None = None  # each path's size in bytes (pipeline/fingerprint.py), None where it is
    #   gone or the source does not take it (a list file's URLs, outside --incremental)
    mtimes_ns: list[int | None] | None = None  # each path's modification time, ns since the epoch
    sha256: list[str | None] | None = None  # each path's content hash, with --fingerprint content
    etags: list[str | None] | None = None  # an object's ETag, beside its size and time (a store's times are
    #   whole seconds: the ETag tells two writes of one second apart); None for a file that is not an object.
    #   Kept in the night's published listing (nights.LISTING_SCHEMA), which is what the next night compares; rows
    #   do not carry it
    skipped: list[str] = field(default_factory=list)  # every folder below the input not listed (encoded): an
    #   incremental night keeps its files as they were (pipeline/nights.py)

    @classmethod
    def of(cls, found: list[tuple[str, int | None, int | None, str | None]], ignored: int, **more) -> Listing:
        """A listing of (encoded path, size, mtime_ns, ETag or None) found in any order: sorted by path."""
        found.sort(key=itemgetter(0))
        return cls([item[0] for item in found], ignored, sizes=[item[1] for item in found],
                   mtimes_ns=[item[2] for item in found], etags=[item[3] for item in found], **more)


def open_source(config: Config):
    """The run's source: --input-list's file, INPUT as a URL (s3://, gs://, az://), or INPUT as a local folder."""
    if config.input_list is not None or isinstance(config.input_dir, str):
        from pipeline import remote

        if config.input_list is not None:
            return remote.ListFile(Path(config.input_list), config.fetch_threads, stat_urls=config.incremental)
        return remote.ObjectStore(config.input_dir, config.fetch_threads)
    return LocalFolder(config.input_dir)


def encode_path(relative: str) -> str:
    """A relative path (os.fsdecode's text, undecodable bytes as surrogates) as valid UTF-8 text that names exactly
    one file: every backslash doubled, every byte that is not UTF-8 written \\xNN. decode_path reverses it."""
    if relative.isascii() and "\\" not in relative:  # most names: nothing to escape (and the listing's hot path)
        return relative
    return _RAW_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", relative.replace("\\", "\\\\"))


def decode_path(path: str) -> str:
    """The file system's name (os.fsdecode's text) of an encoded path."""
    return os.fsdecode(_ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)),
                                   path).encode("utf-8", "surrogateescape"))


_RAW_BYTE = re.compile("[\udc80-\udcff]")  # how os.fsdecode spells a byte that is not UTF-8
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def _folder_cause(error: OSError) -> str:
    if error.errno in (errno.ENOENT, errno.ENOTDIR):
        return causes.FOLDER_VANISHED
    if error.errno == errno.ENAMETOOLONG:
        return causes.PATH_TOO_LONG
    return causes.FOLDER_UNREADABLE


@dataclass(frozen=True)
class LocalFolder:
    """Every image-named entry under a folder, recursively, following symlinked folders once each."""

    root: Path

    def check(self) -> None:
        """Refuse an input that cannot be listed at all, before anything is written."""
        try:
            found = self.root.exists()
        except OSError as error:  # a parent this user may not enter
            raise InputError(f"cannot reach input folder {self.root} ({error.strerror}): make it and its parents "
                             "readable by this user") from error
        if not found:
            raise InputError(f"input folder {self.root} does not exist: pass an existing folder of images")
        if not self.root.is_dir():
            raise InputError(f"input {self.root} is not a folder: pass the folder that holds the images")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise InputError(f"cannot list input folder {self.root}: make it readable by this user")

    def describe(self) -> str:
        """The input as the run's identity names it."""
        return str(self.root.resolve())

    def list(self) -> Listing:
        """The sorted listing; InputError when INPUT itself cannot be listed or holds no image. A folder below it
        that cannot be listed (vanished, unreadable, its path too long) is logged and counted, and listing goes on."""
        self.check()
        walk = _Walk(self.root)
        walk.run()
        listing = Listing.of([(encode_path(path), size, mtime, None) for path, size, mtime in walk.items],
                             walk.ignored, unlisted=dict(sorted(walk.unlisted.items())),
                             unlisted_paths=walk.unlisted_paths,
                             skipped=sorted(encode_path(path) for path in walk.skipped))
        if not listing.paths:
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            unlisted = sum(listing.unlisted.values())
            not_listed = f", {unlisted} folders could not be listed (see the log)" if unlisted else ""
            raise InputError(f"found 0 images under {self.root} ({listing.ignored} other files ignored{not_listed}); "
                             f"image extensions are: {extensions} (any case)")
        return listing

    def open(self, path: str, max_bytes: int | None = None) -> BinaryIO:
        """One listed item (its encoded path), open for reading, or causes.Unusable saying why it cannot be read
        (more than max_bytes: too large)."""
        return open_file(self.root / decode_path(path), max_bytes)


class _Walk:
    """One listing of a folder tree. Real subfolders are listed first; symlinked folders after them, in name order,
    each only if its target was not listed already (a loop, or a second way to a folder), so every folder is listed
    once, under its real path when that lies inside the input."""

    def __init__(self, root: Path):
        self.root = root
        self.items: list[tuple[str, int | None, int | None]] = []  # (relative path as os.fsdecode spells it,
        #   size, mtime_ns)
        self.skipped: list[str] = []  # every folder not listed
        self.ignored = 0
        self.unlisted: dict[str, int] = {}
        self.unlisted_paths: list[dict] = []
        self.listed: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of each folder listed -> its relative path
        self.linked: list[str] = []  # symlinked folders found, not yet listed

    def run(self) -> None:
        folders = [""]
        while folders or self.linked:
            if not folders:
                self.linked.sort(reverse=True)
                folders.append(self.linked.pop())
            self._list(folders.pop(), folders)

    def _list(self, relative_dir: str, folders: list[str]) -> None:
        folder = self.root / relative_dir
        try:
            status = os.stat(folder)
            where = self.listed.setdefault((status.st_dev, status.st_ino), relative_dir)
            if where != relative_dir:
                _logger.warning("%s is a symlink to a folder listed already (%s): not listed again",
                                encode_path(relative_dir), encode_path(where) or "INPUT")
                return
            with os.scandir(folder) as entries:
                found = [(*self._sort(entry, relative_dir), entry.path) for entry in entries]
        except OSError as error:
            if not relative_dir:
                raise InputError(f"cannot list input folder {self.root} ({error.strerror}): make it readable by this "
                                 "user") from error
            self._not_listed(relative_dir, error)
            return
        for kind, relative, full_path in found:
            if kind == "folder":
                folders.append(relative)
            elif kind == "link":
                self.linked.append(relative)
            elif kind == "item":
                self.items.append((relative, *stat_file(full_path)))
            elif kind == "ignored":
                self.ignored += 1

    def _sort(self, entry: os.DirEntry, relative_dir: str) -> tuple[str, str]:
        """What an entry is: a folder, a symlinked folder, an item (any image-named entry that is not a folder:
        a file, a symlink to anything, a FIFO, socket or device), ignored, or gone (vanished while listed)."""
        relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                return "folder", relative
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                return "item", relative
            if entry.is_symlink() and entry.is_dir():
                return "link", relative
        except FileNotFoundError:
            return "gone", relative
        except OSError:  # a symlink whose target cannot be looked at: not a folder to list
            pass
        return "ignored", relative

    def _not_listed(self, relative_dir: str, error: OSError) -> None:
        cause = _folder_cause(error)
        self.skipped.append(relative_dir)
        self.unlisted[cause] = self.unlisted.get(cause, 0) + 1
        text = str(causes.Unusable(cause, error.strerror))
        if len(self.unlisted_paths) < LOGGED_FOLDERS:
            self.unlisted_paths.append({"path": encode_path(relative_dir), "error": text})
            _logger.warning("cannot list folder %s (%s): its files get no rows; the run goes on",
                            encode_path(relative_dir), text)
        elif len(self.unlisted_paths) == LOGGED_FOLDERS and sum(self.unlisted.values()) == LOGGED_FOLDERS + 1:
            _logger.warning("more folders cannot be listed: counted, not logged one by one")
