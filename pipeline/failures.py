"""Read an output's failed rows back: all of them for `pipeline errors`, the first few for the run's summary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TextIO

from pipeline.causes import cause_of
from pipeline.config import Refused
from pipeline.runfolder import PLAN_NAME, RunFolder


class OutputError(Refused):
    """The folder is not the output of a classify run; the message names the fix."""


def failed_rows(output_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, error) of every error row of the committed shards of the plan, in plan order, one shard in memory at a
    time. Only the plan's own shards are read, whatever else the folder holds (the input itself, say)."""
    folder = RunFolder(output_dir)
    plan = folder.load_plan() if output_dir.is_dir() else None
    if plan is None:
        runs = sorted(path.parent for path in output_dir.glob(f"**/{PLAN_NAME}")) if output_dir.is_dir() else []
        if runs:
            raise OutputError(f"{output_dir} holds partitioned runs: pass one run's folder, for example {runs[-1]}")
        raise OutputError(f"{output_dir} is not the output of a classify run (it has no {PLAN_NAME}): "
                          "pass the OUTPUT folder given to `pipeline classify`")
    records, _ = folder.committed(plan)
    for shard, record in sorted(records.items()):
        if record.get("status_counts", {}).get("error", 0):
            yield from zip(*folder.failed_rows(plan, shard), strict=True)


def first_failures(output_dir: Path, limit: int = 5) -> list[tuple[str, str]]:
    """The first few failed rows, for the summary; shards without errors are skipped by their records."""
    return list(islice(failed_rows(output_dir), limit))


def _printable(text: str) -> str:
    """text on one line: control characters (a newline in a file name) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def text_line(path: str, error: str) -> str:
    return f"{_printable(path)}\t{_printable(error)}"


def json_line(path: str, error: str) -> str:
    return json.dumps({"path": path, "cause": cause_of(error), "error": error}, ensure_ascii=False)


def print_failures(output_dir: Path, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print every failed row, one a line; returns how many. A closed pipe (`| head`) ends it quietly."""
    count = 0
    try:
        for path, error in failed_rows(output_dir):
            print(json_line(path, error) if as_json else text_line(path, error), file=out)
            count += 1
        out.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error when Python flushes at exit
    return count
