#!/usr/bin/env python3
"""GPU benchmark (issue 5): real-photo corpus, the job and the two baselines in one call.

    PYTHONPATH=. python3 scripts/bench.py --count 100000 --json $OUT/bench.json

Every figure is a whole process started here: wall time from spawn to exit, the time until the
job logs its first batch on the device, its steady rate (first batch to last commit, from its
summary line), peak RSS of the main process and of its process tree, and peak GPU memory.
Also checks the GPU path's logits against the CPU fp32 path on real photos (seeded weights with
non-trivial BatchNorm statistics). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from repo_env import REPO, repo_env

ENVIRONMENT = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF",
               "CUDA_VISIBLE_DEVICES")  # what changes the figures without changing the code: saved with them
MILESTONES = {"planned_s": "INFO pipeline.runner: planned ", "classifying_s": "INFO pipeline.runner: classifying ",
              "first_batch_s": "first batch on"}  # seconds from spawn to the job's log line that says so


def _tree_rss_kib(pid: int) -> tuple[int, int]:
    """(RSS of pid, RSS of pid and all its descendants), in KiB."""
    def rss(p: int) -> int:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def children(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss(p)
        stack += children(p)
    return rss(pid), total


def run_process(args: list[str], log_path: Path) -> dict:
    """Run one whole process; time it, watch its memory, note when it logs its MILESTONES."""
    env = repo_env(PYTHONUNBUFFERED="1")
    started = time.monotonic()
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen: dict = {**dict.fromkeys(MILESTONES), "summary": None}
    peaks = [0, 0]

    def read_stderr() -> None:
        with open(log_path, "w") as log:
            for line in process.stderr:
                log.write(line)
                for key, marker in MILESTONES.items():
                    if seen[key] is None and marker in line:
                        seen[key] = time.monotonic() - started
                if "done: images=" in line:
                    seen["summary"] = line.strip()

    reader = threading.Thread(target=read_stderr)
    reader.start()
    while process.poll() is None:
        main_rss, tree_rss = _tree_rss_kib(process.pid)
        peaks = [max(peaks[0], main_rss), max(peaks[1], tree_rss)]
        time.sleep(0.2)
    reader.join()
    result = {"rc": process.returncode, "wall_s": time.monotonic() - started,
              **{key: seen[key] for key in MILESTONES}, "main_rss_mib": peaks[0] / 1024,
              "tree_rss_mib": peaks[1] / 1024, "log": str(log_path)}
    if seen["summary"]:
        for key, value in re.findall(r"(\w+(?:/s)?)=([\d.]+)", seen["summary"]):
            result[key] = float(value)
    return result


def job(corpus: Path, out: Path, logs: Path, name: str, *options: str) -> dict:
    args = [sys.executable, "-m", "pipeline", "classify", str(corpus), str(out), "--progress", "log", *options]
    result = run_process(args, logs / f"{name}.log")
    result["images_per_s"] = result.get("images", 0) / result["wall_s"]
    return result


def baseline(recipe: str, corpus: Path, logs: Path, workers: int) -> dict:
    out = logs / f"{recipe}.npy"
    result = run_process([sys.executable, str(REPO / "scripts" / "baselines.py"), recipe, str(corpus), str(out),
                          "--workers", str(workers)], logs / f"{recipe}.log")
    result["images"] = len(np.load(out)) if out.exists() else 0
    result["images_per_s"] = result["images"] / result["wall_s"]
    return result


def corpus(root: Path, count: int, formats: str = "jpeg") -> Path:
    folder = root / f"{formats.replace(',', '-')}-{count}"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), "--out", str(folder), "--count",
                    str(count), "--formats", formats], check=True)
    return folder


def agreement(corpus_dir: Path, work: Path, logs: Path) -> dict:
    """Per-image cosine of GPU-path logits (nvJPEG, fp16) against the CPU fp32 path, seeded weights."""
    import pyarrow.dataset as ds
    import torch
    from synthetic import seeded_state_dict

    weights = work / "seeded.pt"
    torch.save(seeded_state_dict(), weights)
    runs = {}
    for name, options in {"gpu": ["--device", "cuda"], "cpu": ["--device", "cpu", "--precision", "fp32"]}.items():
        job(corpus_dir, work / f"agree-{name}", logs, f"agree-{name}", "--weights", str(weights), *options)
        table = ds.dataset(str(work / f"agree-{name}"), format="parquet").to_table().sort_by("path")
        runs[name] = np.array(table["logits"].to_pylist(), dtype=np.float64)
    gpu, cpu = runs["gpu"], runs["cpu"]
    cosine = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    return {"images": len(cpu), "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "top1_agreement": float((gpu.argmax(1) == cpu.argmax(1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="images in the main corpus")
    parser.add_argument("--small", type=int, default=20_000, help="images in the corpus for baselines and memory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--job-options", default="", help="extra options for the job runs, e.g. --decode cpu")
    parser.add_argument("--only", default="job,agree,cpu-decode,png,small,plain,timm",
                        help="comma list of the runs to do")
    args = parser.parse_args()
    import torch  # here, so that --help needs no torch

    if not torch.cuda.is_available():
        sys.exit("bench.py needs CUDA: it times the job's GPU path and both baselines on a GPU "
                 "(`make bench-cpu` is the CPU benchmark)")
    only = set(args.only.split(","))
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "environment": {name: os.environ.get(name) for name in ENVIRONMENT}}
    big, small = corpus(args.work, args.count), corpus(args.work, args.small)
    workers = ["--workers", str(args.workers), *args.job_options.split()]
    runs = [
        ("job", lambda: job(big, args.work / "out-job", logs, "job", "--weights", "random", *workers)),
        ("small", lambda: job(small, args.work / "out-small", logs, "small", "--weights", "random", *workers)),
        ("cpu-decode", lambda: job(small, args.work / "out-cpu", logs, "cpu-decode", "--weights", "random",
                                   "--decode", "cpu", *workers)),
        ("png", lambda: job(corpus(args.work, args.small // 2, "png,webp"), args.work / "out-png", logs, "png",
                            "--weights", "random", *workers)),
        ("agree", lambda: agreement(corpus(args.work, 1000), args.work, logs)),
        ("plain", lambda: baseline("plain", big, logs, args.workers)),
        ("timm", lambda: baseline("timm", big, logs, args.workers)),
    ]
    for name, run in runs:
        if name in only:
            for out in args.work.glob(f"out-{name}*"):
                subprocess.run(["rm", "-rf", str(out)], check=True)
            results[name] = run()
            print(name, json.dumps(results[name]), flush=True)
            if args.json:  # after every run: a call cut short still leaves what it measured
                args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'run':<11}{'images':>8}{'wall s':>8}{'img/s':>9}{'steady':>9}{'1st s':>7}{'rss MiB':>9}"
          f"{'tree MiB':>10}{'gpu GiB':>8}{'plan s':>8}")
    for name, r in results.items():
        if isinstance(r, dict) and "wall_s" in r:
            print(f"{name:<11}{r.get('images', 0):>8.0f}{r['wall_s']:>8.1f}{r['images_per_s']:>9.0f}"
                  f"{r.get('steady_img/s', 0):>9.0f}{r.get('first_batch_s') or 0:>7.1f}{r['main_rss_mib']:>9.0f}"
                  f"{r['tree_rss_mib']:>10.0f}{r.get('gpu_peak_gib', 0):>8.2f}{r.get('planned_s') or 0:>8.1f}")
    if "agree" in results:
        print("agreement (GPU fp16 nvJPEG vs CPU fp32):", json.dumps(results["agree"]))


if __name__ == "__main__":
    main()
