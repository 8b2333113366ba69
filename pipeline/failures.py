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
from pipeline.plan import PLAN_NAME


class OutputError(Exception):
    """The folder is not the output of a classify run; the message names the fix."""


def failed_rows(output_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, error) of every error row of the committed shards, in plan order, one shard in memory at a time."""
    if not (output_dir / PLAN_NAME).is_file():
        runs = sorted(plan.parent for plan in output_dir.glob(f"**/{PLAN_NAME}")) if output_dir.is_dir() else []
        if runs:
            raise OutputError(f"{output_dir} holds partitioned runs: pass one run's folder, for example {runs[-1]}")
        raise OutputError(f"{output_dir} is not the output of a classify run (it has no {PLAN_NAME}): "
                          "pass the OUTPUT folder given to `pipeline classify`")
    import pyarrow.dataset as ds  # here, not at the top: it imports pandas where installed, 0.4 s of every start

    shards = ds.dataset(output_dir, format="parquet")  # names starting with '_' or '.' are skipped
    for shard in sorted(shards.get_fragments(), key=lambda fragment: fragment.path):
        table = shard.to_table(columns=["path", "error"], filter=ds.field("status") == "error")
        yield from zip(table["path"].to_pylist(), table["error"].to_pylist(), strict=True)


def first_failures(output_dir: Path, limit: int = 5) -> list[tuple[str, str]]:
    """The first few failed rows, for the summary; shards without errors are skipped by their statistics."""
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
