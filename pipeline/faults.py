"""Test-only fault hooks at named points of a durable write, off unless an environment variable names them.

PIPELINE_TEST_PAUSE=shard-write,manifest-rename  sleep PIPELINE_TEST_PAUSE_S seconds (default 0.5) at those points,
                                                 logging a line first, so that a test can kill the run there
PIPELINE_TEST_PAUSE=shard-rename@2               only the 2nd time that point is reached (a run held mid-way)
PIPELINE_TEST_FAIL=shard-fsync@3                 raise EIO at the 3rd time that point is reached (default: the 1st)

A point is KIND-STEP: KIND is what is written (shard, record, manifest, plan, file), STEP is write (half the bytes
are written), fsync (before the file's fsync), rename (fsynced, not yet published) or dir-fsync (published, folder
not yet fsynced).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from pathlib import Path

_logger = logging.getLogger(__name__)

_PAUSE = {point: int(at or 0)  # 0: every time
          for point, _, at in (entry.partition("@") for entry in os.environ.get("PIPELINE_TEST_PAUSE", "").split(","))
          if point}
_PAUSE_S = float(os.environ.get("PIPELINE_TEST_PAUSE_S", "0.5"))
_FAIL_POINT, _, _FAIL_AT = os.environ.get("PIPELINE_TEST_FAIL", "").partition("@")
_reached: Counter[str] = Counter()


def kind(path: Path) -> str:
    """What a published file is, by its name."""
    if path.name.startswith("part-") and path.suffix == ".parquet":
        return "shard"
    if path.parent.name == "_shards":
        return "record"
    return {"_SUCCESS": "manifest", "_plan.arrow": "plan"}.get(path.name, "file")


def at(step: str, path: Path) -> None:
    """Pause or fail here when the environment asks for it; otherwise do nothing."""
    if not _PAUSE and not _FAIL_POINT:
        return
    point = f"{kind(path)}-{step}"
    _reached[point] += 1
    if _PAUSE.get(point) in (0, _reached[point]):
        _logger.warning("test pause at %s (%s) for %.2f s", point, path.name, _PAUSE_S)
        time.sleep(_PAUSE_S)
    if point == _FAIL_POINT and _reached[point] == int(_FAIL_AT or 1):
        _logger.warning("test failure at %s (%s)", point, path.name)
        raise OSError(errno.EIO, os.strerror(errno.EIO))
