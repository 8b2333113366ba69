"""Test-only hooks, off unless an environment variable names them, and then read once at import.

Faults at named points of a durable write (pipeline.durable calls at() at each step; a no-op when unset):

PIPELINE_TEST_PAUSE=shard-write,manifest-rename  sleep PIPELINE_TEST_PAUSE_S seconds (default 0.5) at those points,
                                                 logging a line first, so that a test can kill the run there
PIPELINE_TEST_PAUSE=shard-rename@2               only the 2nd time that point is reached (a run held mid-way)
PIPELINE_TEST_RELEASE=/tmp/x                      a pause ends early once that file exists (the test releases it)
PIPELINE_TEST_FAIL=shard-fsync@3                 raise EIO at the 3rd time that point is reached (default: the 1st)

A point is KIND-STEP: KIND is what is written (shard, record, manifest, plan, file), STEP is write (half the bytes
are written), fsync (before the file's fsync), rename (fsynced, not yet published) or dir-fsync (published, folder
not yet fsynced).

A decode worker's death (pipeline.runner wraps the dataset only when it is set; the per-image path is untouched):
PIPELINE_TEST_CRASH_ON=a.png,b.jpg               a DataLoader worker decoding a file of that name kills itself
                                                 with SIGSEGV (outside a worker it decodes the file as usual)
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path, PurePosixPath

_logger = logging.getLogger(__name__)

_PAUSE = {point: int(at or 0)  # 0: every time
          for point, _, at in (entry.partition("@") for entry in os.environ.get("PIPELINE_TEST_PAUSE", "").split(","))
          if point}
_PAUSE_S = float(os.environ.get("PIPELINE_TEST_PAUSE_S", "0.5"))
_RELEASE = os.environ.get("PIPELINE_TEST_RELEASE", "")
_FAIL_POINT, _, _FAIL_AT = os.environ.get("PIPELINE_TEST_FAIL", "").partition("@")
_reached: Counter[str] = Counter()
CRASH_ON_ENV = "PIPELINE_TEST_CRASH_ON"
_CRASH_ON = frozenset(name for name in os.environ.get(CRASH_ON_ENV, "").split(",") if name)


def kind(path: Path) -> str:
    """What a published file is, by its name."""
    from pipeline.runfolder import MANIFEST_NAME, PLAN_NAME, RECORDS_DIR  # here: runfolder imports this module

    if path.name.startswith("part-") and path.suffix == ".parquet":
        return "shard"
    if path.parent.name == RECORDS_DIR:
        return "record"
    return {MANIFEST_NAME: "manifest", PLAN_NAME: "plan"}.get(path.name, "file")


def at(step: str, path: Path) -> None:
    """Pause or fail here when the environment asks for it; otherwise do nothing."""
    if not _PAUSE and not _FAIL_POINT:
        return
    point = f"{kind(path)}-{step}"
    _reached[point] += 1
    if _PAUSE.get(point) in (0, _reached[point]):
        _logger.warning("test pause at %s (%s) for %.2f s", point, path.name, _PAUSE_S)
        _pause()
    if point == _FAIL_POINT and _reached[point] == int(_FAIL_AT or 1):
        _logger.warning("test failure at %s (%s)", point, path.name)
        raise OSError(errno.EIO, os.strerror(errno.EIO))


class _Crashing:
    """A dataset whose items named in PIPELINE_TEST_CRASH_ON kill the DataLoader worker that decodes them."""

    def __init__(self, dataset, names: frozenset[str]):
        self.dataset, self.names = dataset, names
        self.indices = dataset.indices  # what the guard reads

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, position: int) -> str:
        return self.dataset.name(position)

    def __getitem__(self, position: int):
        name = PurePosixPath(self.dataset.paths[self.dataset.indices[position]].as_py()).name
        from torch.utils.data import get_worker_info

        if name in self.names and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.dataset[position]


def crashing(dataset, names: frozenset[str] | None = None):
    """The dataset itself, or, when PIPELINE_TEST_CRASH_ON names files (or names is given), a wrapper whose
    workers die on those files."""
    names = _CRASH_ON if names is None else names
    return _Crashing(dataset, names) if names else dataset


def _pause() -> None:
    """Sleep PIPELINE_TEST_PAUSE_S seconds, or until the PIPELINE_TEST_RELEASE file exists."""
    ends = time.monotonic() + _PAUSE_S
    while (left := ends - time.monotonic()) > 0 and not (_RELEASE and os.path.exists(_RELEASE)):
        time.sleep(min(left, 0.05) if _RELEASE else left)
