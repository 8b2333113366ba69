#!/usr/bin/env python3
"""Time from SIGTERM to exit of a running job (issue 4: within 10 s on a GPU), then resume and verify.

    PYTHONPATH=. python3 scripts/bench_stop.py CORPUS --after 5

Starts `python -m pipeline classify CORPUS OUT` in its own process group, waits until it logs its
first batch on the device plus --after seconds, sends SIGTERM to the whole group (as Slurm and
Ctrl-C do), and times the exit. Then re-runs the same command to the end and runs
`python -m pipeline verify OUT`. Prints one line per step.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from repo_env import repo_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-stop"))
    parser.add_argument("--after", type=float, default=5.0, help="seconds after the first batch")
    args = parser.parse_args()
    subprocess.run(["rm", "-rf", str(args.out)], check=True)
    env = repo_env()
    command = [sys.executable, "-m", "pipeline", "classify", str(args.corpus), str(args.out), "--weights", "random",
               "--progress", "log"]
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in job.stderr:
        if "first batch on" in line:
            break
    time.sleep(args.after)
    sent = time.monotonic()
    os.killpg(job.pid, signal.SIGTERM)
    tail = job.stderr.read()
    rc = job.wait()
    print(f"SIGTERM {args.after:.0f} s after the first batch: exit {rc} after {time.monotonic() - sent:.2f} s")
    print("  " + "\n  ".join(line for line in tail.splitlines() if "INFO" in line or "ERROR" in line or
                             "WARNING" in line)[-1500:])
    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    print(f"resume: exit {resumed.returncode}; {[line for line in resumed.stderr.splitlines() if 'done:' in line]}")
    verify = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(args.out)], env=env, capture_output=True,
                            text=True)
    print(f"verify: exit {verify.returncode}\n  {verify.stdout.strip()[-600:]}\n  {verify.stderr.strip()[-600:]}")


if __name__ == "__main__":
    main()
