"""The fault-injection loop: SIGKILL real runs at random moments and at named points of a commit, resume, compare.

Used by scripts/soak.py (`make soak`, 100 kills and more) and tests/test_kills.py (a few kills, in CI), which imports
it as scripts.kill_loop; it imports nothing else from scripts/, so it loads either way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.verify import Check, verify_output

REPO = Path(__file__).resolve().parent.parent

# Where a kill is aimed: the test pause points of pipeline/testhooks.py, or a random moment of the run.
POINTS = ("plan-write", "plan-rename", "shard-write", "shard-fsync", "shard-rename", "shard-dir-fsync",
          "record-write", "record-rename", "manifest-write", "manifest-rename", "random")
RUN_COLUMNS = ["run_id", "run_started_at"]  # differ between outputs by design
PAUSE_S = 0.3  # how long a run sleeps at the point a kill is aimed at: the kill lands inside that step


@dataclass
class Figures:
    kills: int = 0
    kills_at: Counter = field(default_factory=Counter)  # point -> kills that landed there
    runs: int = 0  # processes started
    resumes: int = 0  # processes started on an output after a kill
    outputs: int = 0  # outputs taken from empty to finished
    rows_expected: int = 0
    rows_lost: int = 0  # rows of the uninterrupted run missing from a finished output
    rows_duplicated: int = 0  # rows present more than once
    rows_differing: int = 0  # rows whose values differ from the uninterrupted run's
    temp_files_left_by_kills: int = 0  # hidden .tmp files found right after a kill (removed by the resume)
    shard_reads: int = 0  # reads of visible shards by the poller while runs were going
    unreadable_shards_seen: int = 0  # visible shards that failed to read in full
    verify_failures: int = 0  # finished outputs that `verify` did not pass
    problems: list[str] = field(default_factory=list)


class Poller(threading.Thread):
    """Reads every visible part file again and again while runs go, as a warehouse reader would."""

    def __init__(self, output_dir: Path, figures: Figures):
        super().__init__(daemon=True)
        self.output_dir, self.figures = output_dir, figures
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for path in sorted(self.output_dir.glob("*.parquet")):
                try:
                    pq.read_table(path)
                    self.figures.shard_reads += 1
                except FileNotFoundError:  # never expected: committed shards are not removed
                    self.figures.problems.append(f"{path.name} vanished while visible")
                except Exception as error:
                    self.figures.unreadable_shards_seen += 1
                    self.figures.problems.append(f"{path.name} unreadable while visible: {error}")
            self.done.wait(0.01)


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "classify", *args],
                                env={**os.environ, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)


def _wait_for_pause(process: subprocess.Popen, log: Path, point: str, occurrence: int) -> bool:
    """Block until the run pauses at point for the occurrence-th time (True) or exits first (False)."""
    marker = f"test pause at {point} ".encode()
    while process.poll() is None:
        if log.read_bytes().count(marker) >= occurrence:
            return True
        time.sleep(0.005)
    return False


def _rows(output_dir: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in sorted(output_dir.glob("*.parquet"))])


def compare(output_dir: Path, reference: pa.Table, figures: Figures) -> None:
    """Count lost, duplicated and differing rows against the uninterrupted run, and run `verify`."""
    table = _rows(output_dir)
    paths = Counter(table.column("path").to_pylist())
    expected = reference.column("path").to_pylist()
    figures.rows_expected += len(expected)
    figures.rows_lost += sum(1 for path in expected if path not in paths)
    figures.rows_duplicated += sum(count - 1 for count in paths.values())
    if table.num_rows == reference.num_rows:  # every value but which run wrote it, row by row
        mine, theirs = (t.sort_by("path").drop_columns(RUN_COLUMNS).to_pylist() for t in (table, reference))
        figures.rows_differing += sum(a != b for a, b in zip(mine, theirs, strict=True))
    for column in RUN_COLUMNS:  # one run, however often resumed
        if len(table.column(column).unique()) != 1:
            figures.problems.append(f"{output_dir.name}: {column} differs between its rows")
    report = verify_output(output_dir)
    if report.exit_code != Check.OK:
        figures.verify_failures += 1
        figures.problems.append("verify: " + " | ".join(report.lines()))


def one_output(input_dir: Path, output_dir: Path, options: list[str], reference: pa.Table, run_s: float, shards: int,
               figures: Figures, rng: random.Random, max_kills: int, schedule: list[str]) -> None:
    """Take output_dir from empty to finished through up to max_kills SIGKILLs, each followed by a resume.

    Kills are aimed at the points of `schedule` in turn (consumed), then at points drawn by rng."""
    poller = Poller(output_dir, figures)
    output_dir.mkdir(parents=True)
    poller.start()
    kills_here = finishing_kills = 0
    process = None
    try:
        while True:
            started_before = (output_dir / "_plan.arrow").exists()
            remaining = shards - len(list(output_dir.glob("*.parquet")))  # shards this run will still write
            reachable = [point for point in POINTS if not (started_before and point.startswith("plan-"))
                         and not (remaining == 0 and point.startswith(("shard-", "record-")))]
            point = None
            if kills_here < max_kills and not (remaining == 0 and finishing_kills >= 1):  # one kill at the end is
                point = schedule.pop(0) if schedule else rng.choice(reachable)  # enough: the rest go to the shards
                finishing_kills += remaining == 0
            env = {"PIPELINE_TEST_PAUSE": point, "PIPELINE_TEST_PAUSE_S": str(PAUSE_S)} if point else {}
            log = output_dir.parent / f"{output_dir.name}-{figures.runs}.log"
            process = _start([str(input_dir), str(output_dir), *options], log, env if point != "random" else {})
            figures.runs += 1
            figures.resumes += kills_here > 0
            if point == "random":
                time.sleep(rng.uniform(0, run_s))
                aimed = process.poll() is None
            elif point is not None:
                once = point.startswith(("plan-", "manifest-"))  # written once per run; shards and records each
                aimed = _wait_for_pause(process, log, point, 1 if once else rng.randint(1, max(1, min(3, remaining))))
            else:
                aimed = False
            if aimed:
                os.killpg(process.pid, signal.SIGKILL)  # the run and its decode workers, as a node failure would
                process.wait()
                figures.kills += 1
                figures.kills_at[point] += 1
                kills_here += 1
                figures.temp_files_left_by_kills += len(list(output_dir.rglob(".*.tmp")))
                continue
            if process.wait(timeout=600) != 0:
                figures.problems.append(f"a run exited {process.returncode}: {log.read_text()[-2000:]}")
                return
            break
    finally:
        if process is not None and process.poll() is None:  # the loop itself was interrupted: leave no run behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        poller.done.set()
        poller.join()
    if list(output_dir.rglob(".*.tmp")):
        figures.problems.append(f"temporary files left in a finished output: {list(output_dir.rglob('.*.tmp'))}")
    figures.outputs += 1
    compare(output_dir, reference, figures)


def reference_run(input_dir: Path, output_dir: Path, options: list[str]) -> tuple[pa.Table, float]:
    """An uninterrupted run: its rows and its wall time."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", "classify", str(input_dir), str(output_dir), *options],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {result.stderr}")
    return _rows(output_dir), time.monotonic() - started


def kill_loop(input_dir: Path, work_dir: Path, options: list[str], kills: int, seed: int,
              kills_per_output: int = 12, schedule: list[str] | None = None) -> Figures:
    """At least `kills` SIGKILLs spread over fresh outputs of input_dir, every output checked at its end.

    Kills are aimed at `schedule`'s points first (a point a run never reaches is dropped with that run), then at
    points of POINTS drawn at random."""
    schedule = list(schedule or [])
    figures = Figures()
    reference, run_s = reference_run(input_dir, work_dir / "reference", options)
    shards = len(list((work_dir / "reference").glob("*.parquet")))
    rng = random.Random(seed)
    while figures.kills < kills:
        one_output(input_dir, work_dir / f"out{figures.outputs:03d}", options, reference, run_s, shards, figures, rng,
                   max_kills=min(kills_per_output, kills - figures.kills), schedule=schedule)
    return figures
