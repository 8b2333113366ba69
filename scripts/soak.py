"""`make soak`: SIGKILL real runs at least 100 times, resume each, and write the figures into docs/reliability.md.

    python scripts/soak.py [--kills 100] [--images 24] [--seed 0] [--report docs/reliability.md]

Each kill is aimed at a test pause point of pipeline/testhooks.py (inside a shard, record, manifest or plan write:
mid write, before fsync, before rename, before the folder fsync; each point once first, then drawn at random) or at
a random moment of the run; the killed run is resumed (and may be killed again) until its output is finished, then
checked against an uninterrupted run and by `verify`, while a poller reads every visible shard throughout. Exits 1
when any row is lost, duplicated or differs, or any visible shard was unreadable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from kill_loop import PAUSE_S, POINTS, Figures, kill_loop  # noqa: E402
from synthetic import make_corpus  # noqa: E402

OPTIONS = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--shard-size", "4", "--workers", "1",
           "--progress", "log"]


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return (f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, pyarrow {pa.__version__}")


def code_version() -> str:
    """The commit the soak ran, and whether the working tree differed from it."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "pipeline"], capture_output=True, text=True).stdout
    return f"{commit or 'unknown'}{' with uncommitted changes to pipeline/' if dirty.strip() else ''}"


def report(figures: Figures, wall_s: float, command: str, images: int) -> str:
    clean = not (figures.rows_lost or figures.rows_duplicated or figures.rows_differing
                 or figures.unreadable_shards_seen or figures.verify_failures or figures.problems)
    by_point = "\n".join(f"| `{point}` | {figures.kills_at[point]} |" for point in POINTS)
    problems = "\n".join(f"- {problem}" for problem in figures.problems[:20]) or "none"
    return f"""# Reliability: the kill soak

`make soak` (scripts/soak.py) kills real runs of `python -m pipeline classify` with SIGKILL, sent to the run's whole
process group (the job and its decode workers, as a node failure or the OOM killer would), resumes each killed run
with the same command until its output is finished, and compares every finished output with an uninterrupted run's,
row by row and value by value, and with `python -m pipeline verify`. Meanwhile a poller reads every visible
`*.parquet` file of the output in full, again and again, as a warehouse reader would.

Kills are aimed at the test pause points of `pipeline/testhooks.py` (the run sleeps {PAUSE_S} s there, so the kill lands
inside the step: mid-write of the hidden temp file, before its fsync, before the rename, before the folder's fsync;
of a shard, its record, the `_SUCCESS` manifest or the plan) or at a random moment of the run (start-up, listing,
decoding, inference, anywhere).

## Figures of the last soak

| figure | value |
| --- | --- |
| kills (SIGKILL) | {figures.kills} |
| resumes (runs started after a kill) | {figures.resumes} |
| runs started | {figures.runs} |
| outputs taken from empty to finished | {figures.outputs} |
| rows expected ({images} images × outputs) | {figures.rows_expected} |
| rows lost | {figures.rows_lost} |
| rows duplicated | {figures.rows_duplicated} |
| rows differing from the uninterrupted run | {figures.rows_differing} |
| hidden temp files found right after kills (removed by the resumes) | {figures.temp_files_left_by_kills} |
| reads of visible shards by the poller | {figures.shard_reads} |
| unreadable visible shards seen | {figures.unreadable_shards_seen} |
| finished outputs failing `verify` | {figures.verify_failures} |
| verdict | {"clean" if clean else "FAILED"} |
| wall time | {wall_s / 60:.1f} min |
| date | {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} |
| machine | {machine()} |
| code | `{code_version()}` |
| command | `{command}` |
| run options | `{" ".join(OPTIONS)}` |

Kills by where they were aimed (a kill aimed at a random moment can land anywhere, including a point below):

| aimed at | kills |
| --- | --- |
{by_point}

Problems: {problems}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-") as work:
        make_corpus(Path(work) / "in", args.images, size=(40, 32))
        aimed_first = [point for point in POINTS if point != "random"]  # every point at least once, then at random
        figures = kill_loop(Path(work) / "in", Path(work), OPTIONS, kills=args.kills, seed=args.seed,
                            schedule=aimed_first)
    wall_s = time.monotonic() - started
    command = shlex.join(["python", "scripts/soak.py", *sys.argv[1:]])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report(figures, wall_s, command, args.images))
    print(args.report.read_text())
    failed = (figures.rows_lost or figures.rows_duplicated or figures.rows_differing or figures.unreadable_shards_seen
              or figures.verify_failures or figures.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
