"""Durable publication of a file: write a hidden temp, fsync, rename into place, fsync the folder."""

from __future__ import annotations

import os
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The hidden name a file is written under before it is published; no reader's glob matches it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_publish(path: Path, data: bytes, exclusive: bool = False) -> bool:
    """Make path hold data, all or nothing, surviving a crash once this returns.

    With exclusive, an existing path is left alone and False is returned (the first publisher
    wins, atomically, through link(2)). Errors, an fsync error included, are raised, never retried:
    after a failed fsync the page cache can no longer be trusted (PostgreSQL's lesson).
    """
    temp = temp_name(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
        else:
            os.replace(temp, path)
        fsync_dir(path.parent)
        return True
    finally:
        temp.unlink(missing_ok=True)
