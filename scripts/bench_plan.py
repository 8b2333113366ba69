#!/usr/bin/env python3
"""Planning an incremental night (issue 19): time and peak memory over a folder of many tiny files, 1 % new.

    .venv/bin/python scripts/bench_plan.py --files 1000000 --new 0.01 --work /tmp/bench-plan --json out.json

Steps, each a process of its own:
1. a folder of FILES empty image-named files (1,000 per folder); kept between calls when the count matches;
2. night 1: the real job (`pipeline classify --incremental --partition run_date=n1`, random weights, CPU): every
   file is classified (an `empty file` row each; planning does not decode, the model never runs on error rows);
3. NEW x FILES more files are added, in new folders and beside the old ones;
4. planning night 2 alone, in a process that imports no torch: runner.plan_run (list INPUT with a stat of each
   file, read night 1's listing, compare, publish tonight's listing) with the run identity the job computes
   (printed by a separate process): seconds, and peak RSS of that process with its RSS before planning;
5. night 2 as the real job, whole: wall seconds, the seconds its log gives for planning, its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from repo_env import REPO, repo_env

JOB = ["--weights", "random", "--device", "cpu", "--max-error-rate", "1", "--progress", "log", "--incremental"]
PER_FOLDER = 1000

IDENTITY = """
import json, sys
from pathlib import Path
from pipeline import prepare
from pipeline.config import Config
from pipeline.source import open_source
config = Config(input_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]), weights="random", device="cpu",
                incremental=True, partition=(("run_date", "n2"),))
print(json.dumps(prepare.prepare(config, open_source(config)).identity))
"""

PLAN = """
import json, resource, sys, time
from pathlib import Path
from pipeline import runner
from pipeline.config import Config
from pipeline.runfolder import RunFolder
from pipeline.source import open_source
identity = json.loads(Path(sys.argv[3]).read_text())
config = Config(input_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[2]), weights="random", device="cpu",
                incremental=True, partition=(("run_date", "n2"),))
source, folder = open_source(config), RunFolder(config.run_dir)
folder.path.mkdir(parents=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
plan = runner.plan_run(config, source, folder, identity)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rss_before_mib": before / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "items": len(plan.paths), "deleted": plan.facts["deleted"], "unchanged": plan.facts["unchanged"]}))
"""


def make_files(root: Path, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        folder = root / f"f{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0 or i == start:
            folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(folder / f"{i:08d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root)) if root.is_dir() else 0


def job(input_dir: Path, out: Path, date: str) -> dict:
    log = out.parent / f"night-{date}.log"
    started = time.monotonic()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(input_dir), str(out),
                                    "--partition", f"run_date={date}", *JOB], stderr=sink, env=repo_env())
        _, status, usage = os.wait4(process.pid, 0)  # the job's own peak RSS (its workers are not waited here)
    wall = time.monotonic() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"night {date} exited {os.waitstatus_to_exitcode(status)}:\n{text[-3000:]}")
    planned = re.search(r"planned (\d+) images in \d+ shards in ([\d.]+) s", text)
    return {"wall_s": wall, "planned_items": int(planned[1]), "planning_s_from_log": float(planned[2]),
            "peak_rss_mib": usage.ru_maxrss / 1024, "log_tail": text.strip().splitlines()[-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--new", type=float, default=0.01, help="share of files added before night 2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-plan"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    input_dir, out = args.work / "in", args.work / "out"
    added = int(args.files * args.new)

    if count_files(input_dir) != args.files:
        shutil.rmtree(args.work, ignore_errors=True)
        started = time.monotonic()
        make_files(input_dir, args.files)
        print(f"made {args.files} files in {time.monotonic() - started:.0f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    night1 = job(input_dir, out, "n1")
    print(f"night 1: {night1}", flush=True)
    new_dir = args.work / "new-files"
    shutil.rmtree(new_dir, ignore_errors=True)
    make_files(new_dir, added, start=args.files)  # made aside, then moved in: INPUT keeps its count for a rerun
    moved = []
    for folder in sorted(new_dir.iterdir()):
        target = input_dir / folder.name
        folder.rename(target) if not target.exists() else [f.rename(target / f.name) for f in folder.iterdir()]
        moved.append(target)

    try:
        identity_file = args.work / "identity.json"
        identity_file.write_text(subprocess.run([sys.executable, "-c", IDENTITY, str(input_dir), str(out)],
                                                check=True, capture_output=True, text=True, env=repo_env()).stdout)
        planning = json.loads(subprocess.run([sys.executable, "-c", PLAN, str(input_dir), str(out), str(identity_file)],
                                             check=True, capture_output=True, text=True, env=repo_env()).stdout)
        print(f"planning night 2 alone: {planning}", flush=True)
        shutil.rmtree(out / "run_date=n2")
        night2 = job(input_dir, out, "n2")
        print(f"night 2: {night2}", flush=True)
    finally:
        for target in moved:  # INPUT back to FILES files
            for path in target.glob("*.jpg"):
                if int(path.stem) >= args.files:
                    path.unlink()
    result = {"files": args.files, "added": added, "planning_alone": planning, "night1": night1, "night2": night2,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()},
              "repo": str(REPO)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"planning night 2 over {args.files + added} files ({added} new): {planning['seconds']:.1f} s, peak RSS "
          f"{planning['peak_rss_mib']:.0f} MiB ({planning['rss_before_mib']:.0f} MiB before planning); the whole job: "
          f"{night2['wall_s']:.1f} s, planning {night2['planning_s_from_log']:.1f} s by its log")


if __name__ == "__main__":
    main()
