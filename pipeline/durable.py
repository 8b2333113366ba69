"""Durable publication of a file: write a hidden temp, fsync, rename into place, fsync the folder."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from pipeline import testhooks

# The host as well as the pid: processes on two hosts (containers, say) can have the same pid and publish the same
# file (the plan, _SUCCESS) into a shared OUTPUT at the same moment; one temp file for both would mix their bytes.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.tmp")


class WriteError(Exception):
    """A file could not be written or made durable (disk full, I/O error): fatal, never retried."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or error} (errno {error.errno}). Nothing partial "
                         "is visible: fix the cause (free space, check the disk), then run the same command to resume")
        self.path = path


def temp_name(path: Path) -> Path:
    """The hidden name a file is written under before it is published; no reader's glob matches it."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def published_name(temp: str) -> str | None:
    """The name a temp file (by its file name) was to be published as; None for any other file."""
    match = _TEMP.fullmatch(temp)
    return match["name"] if match else None


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
            half = len(data) // 2
            f.write(memoryview(data)[:half])
            f.flush()
            testhooks.at("write", path)
            f.write(memoryview(data)[half:])
            f.flush()
            testhooks.at("fsync", path)
            os.fsync(f.fileno())
        testhooks.at("rename", path)
        if exclusive:
            try:
                os.link(temp, path)
            except FileExistsError:
                return False
        else:
            os.replace(temp, path)
        testhooks.at("dir-fsync", path)
        fsync_dir(path.parent)
        return True
    except OSError as error:
        raise WriteError(path, error) from error
    finally:
        temp.unlink(missing_ok=True)
