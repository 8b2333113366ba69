"""Why a file has an error row: a small fixed set of plain causes, the `error` text, and counts by cause."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# The `error` column reads "<cause>" or "<cause>: <detail>", the cause being one of these (docs/input.md lists them).
EMPTY = "empty file"
TRUNCATED = "truncated image"
CORRUPT = "corrupt image"
HTML = "not an image (looks like HTML)"
XML = "not an image (looks like XML)"
TEXT = "not an image (looks like text)"
UNSUPPORTED = "unsupported format"
MODE = "unsupported image mode"
BOMB = "decompression bomb"
VANISHED = "file vanished"
BROKEN_LINK = "broken symlink"
UNREADABLE = "unreadable file"
NOT_REGULAR = "not a regular file"  # a FIFO, socket or device under an image name: never opened
TOO_LARGE = "file too large"  # more bytes than --max-file-bytes: never read
TIMED_OUT = "decode timed out"  # a worker decoded it for longer than --decode-timeout: it was killed
CRASHED = "decoder crashed"
OUT_OF_MEMORY = "out of memory"
UNEXPECTED = "unexpected error"

CAUSES = (EMPTY, TRUNCATED, CORRUPT, HTML, XML, TEXT, UNSUPPORTED, MODE, BOMB, VANISHED, BROKEN_LINK, UNREADABLE,
          NOT_REGULAR, TOO_LARGE, TIMED_OUT, CRASHED, OUT_OF_MEMORY, UNEXPECTED)
RETRIED = (VANISHED, BROKEN_LINK, UNREADABLE, TIMED_OUT, CRASHED, OUT_OF_MEMORY, UNEXPECTED)  # causes that may pass
#   by themselves (a file being moved, a permission, a busy store): an incremental night classifies such a file
#   again, changed or not; the others (a corrupt or unsupported file...) wait until the file changes

# Why a folder below INPUT could not be listed: its files get no rows; the summary and the manifest count it.
FOLDER_VANISHED = "folder vanished"  # listed in its parent, gone (or no longer a folder) when listed itself
FOLDER_UNREADABLE = "unreadable folder"  # permission denied, an I/O error
PATH_TOO_LONG = "path too long"  # longer than the system allows
FOLDER_CAUSES = (FOLDER_VANISHED, FOLDER_UNREADABLE, PATH_TOO_LONG)
SEPARATOR = ": "


class Unusable(Exception):
    """A file that cannot be classified, for a known cause; str() is its `error` text."""

    def __init__(self, cause: str, detail: str | None = None):
        super().__init__(cause if detail is None else f"{cause}{SEPARATOR}{detail}")
        self.cause = cause


def error_text(error: BaseException) -> str:
    """The `error` column of a file whose decoding raised error."""
    if isinstance(error, Unusable):
        return str(error)
    if isinstance(error, MemoryError):
        return OUT_OF_MEMORY
    return f"{UNEXPECTED}{SEPARATOR}{type(error).__name__}: {error}"


def cause_of(error: str) -> str:
    """The cause part of an `error` text."""
    return error.split(SEPARATOR, 1)[0]


def error_counts(errors: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many rows have each cause (error rows only), sorted by cause."""
    errors = errors.drop_null()
    if len(errors) == 0:
        return {}
    causes = pc.list_element(pc.split_pattern(errors, SEPARATOR, max_splits=1), 0)
    counts = pc.value_counts(causes).flatten()
    return dict(sorted(zip(counts[0].to_pylist(), counts[1].to_pylist(), strict=True)))
