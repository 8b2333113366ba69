"""One writer per run folder: an flock on a file in it, naming its holder, released by the kernel when its holder
dies, and never held by the holder's children."""

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

from pipeline.config import Refused
from pipeline.durable import WriteError

_logger = logging.getLogger(__name__)

_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    """A forked child (a decode worker) must not keep its parent's locks: an flock belongs to the open file, which
    a fork shares, so a worker orphaned by a kill -9 of its parent would hold the lock on until it ended."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class Locked(Exception):
    """Another live process holds the lock; the message names it."""


class LockError(Refused):
    """The lock cannot be taken at all (the filesystem does not support flock); the message names the fix."""


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


def _busy(path: Path, fd: int) -> Locked:
    folder = path.parent.parent
    return Locked(f"{folder} is being written by {_describe_holder(fd)}: wait for that run to end or stop it, "
                  f"or write to another OUTPUT (lock file {path})")


@contextmanager
def acquire(path: Path, shared: bool = False, wait: bool = False) -> Iterator[Path]:
    """Hold the lock file at path for the duration, or raise Locked at once naming the holder (with `wait`, block
    until the holder lets go instead).

    Exclusive by default: one writer. `shared` holders (the ranks of one multi-process run) exclude exclusive ones
    but not each other. The lock file is never deleted (that would let a second process lock a new file of the
    same name).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise _busy(path, fd) from None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise LockError(
                    f"cannot lock {path}: {error.strerror}. The filesystem of OUTPUT does not support flock "
                    "(Lustre: mount with -o flock; NFS: enable locking). Write OUTPUT to a filesystem that does"
                ) from error
            raise
        _held.add(fd)
        try:
            os.ftruncate(fd, 0)  # shared holders leave it empty: no stale details of a dead holder
            if not shared:
                os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        except OSError as error:
            raise WriteError(path, error) from error
        _logger.debug("holding %s", path)
        yield path
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock


def held(path: Path, shared: bool = False) -> bool:
    """Whether a live process holds the lock file at path (any holder; with `shared`, only an exclusive one would
    exclude a shared holder); creates nothing, and holds nothing after it returns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a filesystem where a read-only descriptor cannot be locked: the real lock decides
        return False
    finally:
        os.close(fd)
    return False


def refuse_if_held(path: Path, shared: bool = False) -> None:
    """Raise Locked naming the holder when a live process holds path in a way that excludes us (a quick check before
    the slow start of a run; the real lock, taken later, decides)."""
    if held(path, shared):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raise _busy(path, fd)
        finally:
            os.close(fd)
