"""The input source: list the work items (sorted image paths) and open one. Today a local folder.

Another source (an object store, a list file) is another class with the same three methods."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.config import Refused
from pipeline.read import open_file

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class InputError(Refused):
    """The input cannot be listed; the message names the fix."""


@dataclass
class Listing:
    paths: list[str]  # image paths relative to the input folder, '/'-separated, sorted
    ignored: int  # files under the folder that are not images by extension
    escaped: list[bool] | None = None  # per path: its name is not valid UTF-8, so it holds \xNN escapes


def _utf8(relative: str) -> tuple[str, bool]:
    """The path as valid UTF-8 text: undecodable bytes (surrogate escapes) become \\xNN; True when any did."""
    try:
        relative.encode("utf-8")
        return relative, False
    except UnicodeEncodeError:
        return os.fsencode(relative).decode("utf-8", "backslashreplace"), True


@dataclass(frozen=True)
class LocalFolder:
    """Every image-named regular file or symlink under a folder, recursively."""

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
        """The sorted listing; InputError when it holds no image."""
        self.check()
        paths: list[tuple[str, bool]] = []
        ignored = 0
        pending = [""]
        while pending:
            relative_dir = pending.pop()
            with self._scandir(relative_dir) as entries:
                for entry in entries:
                    relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(relative)
                    elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                        ignored += 1  # fifos, sockets, devices
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        paths.append(_utf8(relative))
                    else:
                        ignored += 1
        paths.sort()
        if not paths:
            extensions = " ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"found 0 images under {self.root} ({ignored} other files ignored); "
                             f"image extensions are: {extensions} (any case)")
        escaped = [bad for _, bad in paths]
        return Listing(paths=[path for path, _ in paths], ignored=ignored, escaped=escaped if any(escaped) else None)

    def _scandir(self, relative_dir: str):
        folder = self.root / relative_dir
        try:
            return os.scandir(folder)
        except OSError as error:
            raise InputError(f"cannot list folder {folder} ({error.strerror}): make it readable by this user, "
                             "or move it out of the input folder") from error

    def open(self, relative: str) -> BinaryIO:
        """One listed item, open for reading, or causes.Unusable saying why it cannot be read."""
        return open_file(self.root / relative)
