"""Remove what killed runs left behind in OUTPUT: hidden temp files that were never published."""

from __future__ import annotations

import logging
import os
from collections.abc import Container
from pathlib import Path

from pipeline.durable import published_name

_logger = logging.getLogger(__name__)


def remove_temp_files(output_dir: Path, names: Container[str] | None = None) -> int:
    """Delete the temp files under output_dir (of every published name, or only of `names`); return how many.

    Only safe while holding the lock that covers those names: a live writer's temp file looks the same as a dead
    one's. With the whole-output lock, pass no names; a process holding a narrower lock (one rank's shards) passes
    the names it owns.
    """
    removed = 0
    for folder, _, files in os.walk(output_dir):
        for file in files:
            name = published_name(file)
            if name is None or (names is not None and name not in names):
                continue
            Path(folder, file).unlink(missing_ok=True)
            removed += 1
    if removed:
        _logger.info("removed %d temporary files left by an interrupted run", removed)
    return removed
