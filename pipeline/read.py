"""Open one image file without trusting it: refuse what cannot be read, bombs, and content no accepted decoder takes.

Every refusal is an Unusable naming its cause (pipeline/causes.py), for the file's error row.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from pipeline import causes
from pipeline.causes import Unusable

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # by content; Pillow may use no other decoder


def open_file(path: Path, max_bytes: int | None = None) -> BinaryIO:
    """The file, open for reading, or Unusable saying why it cannot be read: anything but a regular file is refused
    before it is opened (opening a device can act on it), a file of more than max_bytes before a byte is read."""
    try:
        kind = _not_regular(os.stat(path).st_mode)  # follows symlinks
        if kind is not None:
            raise _refusal(kind)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # NONBLOCK: a FIFO swapped in since must not hang the worker
    except FileNotFoundError:
        if os.path.islink(path):
            raise Unusable(causes.BROKEN_LINK, f"its target {_link_target(path)} does not exist") from None
        raise Unusable(causes.VANISHED, "it was listed but is no longer there") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Unusable(causes.BROKEN_LINK, "a symlink loop") from None
        raise Unusable(causes.UNREADABLE, error.strerror) from None
    status = os.fstat(fd)
    kind = _not_regular(status.st_mode)
    if kind is not None or status.st_size == 0 or (max_bytes is not None and status.st_size > max_bytes):
        os.close(fd)
        if kind is not None:
            raise _refusal(kind)
        if status.st_size == 0:
            raise Unusable(causes.EMPTY)
        raise Unusable(causes.TOO_LARGE, f"{status.st_size} bytes > limit {max_bytes}")
    return os.fdopen(fd, "rb")


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is ('a FIFO', ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _refusal(kind: str) -> Unusable:
    """A folder behind an image name is an unreadable file (as it always was); a FIFO, socket or device is not a
    regular file."""
    return Unusable(causes.UNREADABLE, kind) if kind == "a folder" else Unusable(causes.NOT_REGULAR, kind)


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "(unknown)"


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb checks (at open, on GIF frames and TIFF tiles) refuse anything over max_pixels."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(file: BinaryIO) -> Image.Image:
    """Pillow's lazy open (the header only), restricted to the accepted formats."""
    try:
        return Image.open(file, formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        file.seek(0)
        raise _not_accepted(file.read(512)) from None


def _not_accepted(head: bytes) -> Unusable:
    """Why content that no accepted decoder recognises is refused, judged from its first bytes."""
    if not head:
        return Unusable(causes.EMPTY)
    Image.init()
    looks_like = [name for name in Image.ID if name in Image.OPEN and _has_magic(name, head[:16])]
    accepted = ", ".join(ACCEPTED_FORMATS)
    for name in looks_like:
        if name in ACCEPTED_FORMATS:
            return Unusable(causes.CORRUPT, f"{name} header cannot be read")
    if looks_like:
        return Unusable(causes.UNSUPPORTED, f"the content looks like {looks_like[0]}; accepted: {accepted}")
    text = _as_text(head)
    if text is not None:
        start = text.lstrip("\ufeff \t\r\n").lower()
        if "<html" in start or "<!doctype html" in start:
            return Unusable(causes.HTML)
        if start.startswith("<") and "<svg" in start:
            return Unusable(causes.UNSUPPORTED, f"the content looks like SVG; accepted: {accepted}")
        return Unusable(causes.XML if start.startswith("<") else causes.TEXT)
    return Unusable(causes.UNSUPPORTED, f"unrecognised content; accepted: {accepted}")


def _has_magic(name: str, prefix: bytes) -> bool:
    """Pillow's check of a format's leading bytes (no decoder runs); formats without magic never match."""
    accept = Image.OPEN[name][1]
    try:
        return bool(accept and accept(prefix))
    except Exception:
        return False


def _as_text(head: bytes) -> str | None:
    """head as text when it is printable UTF-8 (a character cut at the end is allowed), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        text = head[: error.start].decode("utf-8")
    text = text.lstrip("\ufeff")
    return text if text and all(c.isprintable() or c in "\t\r\n\f" for c in text) else None


def failure(error: Exception, max_pixels: int) -> Unusable:
    """The cause of an exception raised while Pillow read the header or decoded the pixels."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        found = re.search(r"\((\d+) pixels\)", str(error))
        return Unusable(causes.BOMB, f"{found.group(1) if found else 'more'} pixels > limit {max_pixels}")
    if isinstance(error, MemoryError):
        return Unusable(causes.OUT_OF_MEMORY)
    if isinstance(error, OSError) and error.errno is not None:  # the file system, not the decoder
        return Unusable(causes.UNREADABLE, error.strerror)
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return Unusable(causes.TRUNCATED, str(error) or type(error).__name__)
    return Unusable(causes.CORRUPT, f"{type(error).__name__}: {error}")
