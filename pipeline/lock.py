"""One writer per output: an flock on a file inside OUTPUT, released by the kernel when its holder dies."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pipeline.durable import WriteError

_logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"  # a leading '_': warehouse readers and table globs skip it


class Locked(Exception):
    """Another live process holds the lock; the message names it."""


class LockError(Exception):
    """The lock cannot be taken at all (the filesystem does not support flock); the message names the fix."""


def lock_path(output_dir: Path, name: str) -> Path:
    return output_dir / LOCKS_DIR / f"{name}.lock"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": sys.argv}


def _describe_holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (it may not have written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0))
    except (OSError, ValueError):
        return "another process (it has not written its details yet, or holds the lock shared)"
    return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']} "
            f"({' '.join(holder.get('command', []))})")


@contextmanager
def acquire(output_dir: Path, name: str = "output", shared: bool = False, wait: bool = False) -> Iterator[Path]:
    """Hold OUTPUT/_locks/NAME.lock for the duration, or raise Locked at once naming the holder (with `wait`,
    block until the holder lets go instead).

    Exclusive by default: one writer per output. `shared` holders (for example the ranks of one multi-process run)
    exclude exclusive ones but not each other; each rank can then hold its own exclusive lock by another name.
    The lock file is never deleted (deleting it would let a second process lock a new file of the same name).
    """
    path = lock_path(output_dir, name)
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Locked(
                f"{output_dir} is being written by {_describe_holder(fd)}: wait for that run to end or stop it, "
                f"or write to another OUTPUT (lock file {path})"
            ) from None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise LockError(
                    f"cannot lock {path}: {error.strerror}. The filesystem of OUTPUT does not support flock "
                    "(Lustre: mount with -o flock; NFS: enable locking). Write OUTPUT to a filesystem that does"
                ) from error
            raise
        try:
            os.ftruncate(fd, 0)  # shared holders leave it empty: no stale details of a dead holder
            if not shared:
                os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        except OSError as error:
            raise WriteError(path, error) from error
        _logger.debug("holding %s", path)
        yield path
    finally:
        os.close(fd)  # releases the lock


def held(output_dir: Path, name: str) -> bool:
    """Whether a live process holds OUTPUT/_locks/NAME.lock, shared or exclusive (a moment's exclusive try)."""
    try:
        fd = os.open(lock_path(output_dir, name), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
