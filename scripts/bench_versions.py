#!/usr/bin/env python3
"""An older commit of the job against this checkout, runs interleaved on one corpus (issue 5).

    git archive REV pipeline | (mkdir -p /tmp/old && tar -x -C /tmp/old)
    PYTHONPATH=. python3 scripts/bench_versions.py /tmp/old CORPUS_DIR --json $OUT/versions.json

or this checkout against itself with options added:

    PYTHONPATH=. python3 scripts/bench_versions.py . CORPUS_DIR --new-args="--batch-size 512"

Figures swing between calls (each call gets a fresh machine), so a change is judged on runs of
both versions taken alternately in one call. Each run is a whole `python -m pipeline classify`
process with defaults (plus --new-args on the checkout's side) and random weights: wall time from
spawn to exit, the time until it logs its first batch on the device, the time from its last log
line to its exit, its peak resident memory when it logs its summary, and that line's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from repo_env import REPO


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM), or None where /proc does not say."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024 if found else None


def start(root: Path, *args: str, extra_env: dict[str, str] | None = None, **options) -> subprocess.Popen:
    """Python running root's code: started in root itself, since `python -m` puts its working folder first on
    sys.path, ahead of PYTHONPATH. Before this was fixed, the runs started in this checkout, so the "old" runs
    ran this checkout's code too (docs/benchmarks.md says which comparisons that voids)."""
    return subprocess.Popen([sys.executable, *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), **(extra_env or {})}, text=True, **options)


def imported_from(root: Path) -> Path:
    """The folder of the pipeline package that a run of root's code imports."""
    process = start(root, "-c", "import pipeline; print(pipeline.__file__)", stdout=subprocess.PIPE)
    out, _ = process.communicate()
    return Path(out.strip()).resolve().parent


def run(root: Path, corpus: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started, first_batch, done, summary, peak = time.monotonic(), None, None, "", None
    process = start(root, "-m", "pipeline", "classify", str(corpus), str(out), "--weights", "random", "--progress",
                    "log", *extra, stderr=subprocess.PIPE)
    for line in process.stderr:
        if first_batch is None and "first batch on" in line:
            first_batch = time.monotonic() - started
        if "done: images=" in line:
            done, summary = time.monotonic(), line
            peak = peak_rss_mib(process.pid)  # read while it lives: no polling, which would slow it
    process.wait()
    ended = time.monotonic()
    return {"rc": process.returncode, "wall_s": ended - started, "first_batch_s": first_batch,
            "exit_s": ended - done if done else None, "main_peak_rss_mib": peak,
            **{key: float(value) for key, value in re.findall(r"(\w+(?:/s)?)=([\d.]+)", summary)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="a folder holding the older commit's pipeline/ package")
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--runs", type=int, default=3, help="runs of each version")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/out-versions"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--new-args", default="", help="options added to the checkout's runs, e.g. '--batch-size 512'")
    args = parser.parse_args()
    args.old, args.corpus, args.out = args.old.resolve(), args.corpus.resolve(), args.out.resolve()
    for root in (args.old, REPO):
        package = imported_from(root)
        if package != root / "pipeline":
            raise SystemExit(f"a run of {root} would import {package}, not {root / 'pipeline'}")
        print(f"runs of {root} import {package}", flush=True)
    rows = []
    for number in range(args.runs):
        for version, root, extra in (("old", args.old, []), ("new", REPO, args.new_args.split())):
            rows.append({"version": version, "run": number, "args": extra, **run(root, args.corpus, args.out, extra)})
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    for version in ("old", "new"):
        mine = [row for row in rows if row["version"] == version]
        walls = sorted(round(row["wall_s"], 2) for row in mine)
        print(f"{version}: wall s {walls} (median {statistics.median(walls)}), first batch s "
              f"{sorted(round(row['first_batch_s'] or 0, 2) for row in mine)}, steady img/s "
              f"{sorted(round(row.get('steady_img/s', 0)) for row in mine)}, exit s "
              f"{sorted(round(row['exit_s'] or 0, 2) for row in mine)}, main peak RSS MiB "
              f"{sorted(round(row['main_peak_rss_mib'] or 0) for row in mine)}")


if __name__ == "__main__":
    main()
