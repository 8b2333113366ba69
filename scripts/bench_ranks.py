#!/usr/bin/env python3
"""Multi-rank benchmark (issue 8): the job as N torchrun processes over one corpus, exactly once.

    PYTHONPATH=. python3 scripts/bench_ranks.py CORPUS --ranks 1,2 --workers 16

For each N, `python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline classify`
writes a fresh output (each rank takes its local rank's GPU, modulo the GPUs there are, and
workers/N decode processes); the script times the whole launch and reads every row back to check
that each input file is one row, once, and that _SUCCESS was written. Prints a table last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
from repo_env import repo_env


def run(corpus: Path, out: Path, ranks: int, workers: int, log: Path) -> dict:
    env = repo_env()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "pipeline", "classify", str(corpus), str(out), "--weights", "random", "--progress", "log",
            "--workers", str(max(1, workers // ranks))]
    started = time.monotonic()
    with open(log, "w") as stream:
        rc = subprocess.run(args, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - started
    paths = ds.dataset(str(out), format="parquet").to_table(columns=["path"])["path"]
    files = sum(1 for p in corpus.rglob("*.jpg"))
    return {"ranks": ranks, "rc": rc, "wall_s": wall, "rows": len(paths), "unique": pc.count_distinct(paths).as_py(),
            "files": files, "success": (out / "_SUCCESS").exists(), "images_per_s": len(paths) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--workers", type=int, default=16, help="decode workers in all, split between ranks")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-ranks"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for ranks in (int(n) for n in args.ranks.split(",")):
        out = args.work / f"out-{ranks}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        rows.append(run(args.corpus, out, ranks, args.workers, args.work / f"ranks-{ranks}.log"))
        print(rows[-1], flush=True)
    print(f"\n{'ranks':>5}{'rc':>4}{'wall s':>8}{'img/s':>8}{'rows':>8}{'unique':>8}{'files':>8}{'_SUCCESS':>9}")
    for r in rows:
        print(f"{r['ranks']:>5}{r['rc']:>4}{r['wall_s']:>8.1f}{r['images_per_s']:>8.0f}{r['rows']:>8}{r['unique']:>8}"
              f"{r['files']:>8}{r['success']!s:>9}")


if __name__ == "__main__":
    main()
