#!/usr/bin/env python3
"""What a process that used the GPU as the job does costs at exit (issue 5).

    PYTHONPATH=. python3 scripts/exit_cost.py CORPUS_DIR [--repeats 3]

On the H100 the job takes 1.3-2.0 s from its last log line to its exit. Each child here does the
job's GPU work up to one step, then returns as the job does; the parent times from the child's
last line to its exit. The steps, each adding to the one before: imports only; CUDA started;
5 GiB allocated and freed in PyTorch's expandable segments (the job's default; the memory stays
cached, as in the job); 500 MB of pinned host memory cached (the pin thread's batches); 40
batches decoded with nvJPEG and resized, as the job's decode threads do. Each step is timed twice:
returning normally (the interpreter's teardown, then the process's end) and with os._exit(0) right
after the last line (the process's end only: the kernel and the GPU driver releasing what it held).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from repo_env import repo_env

STEPS = ("imports", "cuda", "device-memory", "pinned-memory", "nvjpeg")


def child(step: str, corpus: Path, hard: bool) -> None:
    import torch

    from pipeline.infer import pick_device

    reached = STEPS.index(step)
    if reached >= 1:
        device = pick_device("cuda")  # the job's allocator settings, GPU 0 current
        torch.zeros(1, device=device)
    if reached >= 2:
        blocks = [torch.empty(256 << 20, dtype=torch.uint8, device=device) for _ in range(20)]
        del blocks
    if reached >= 3:
        blocks = [torch.empty(15 << 20, dtype=torch.uint8).pin_memory() for _ in range(33)]
        del blocks
    if reached >= 4:
        from held import held_batches, jpeg_files

        from pipeline.decode import Preprocess
        from pipeline.gpu_decode import GpuDecoder
        from pipeline.model import preprocessing_transforms

        decoder = GpuDecoder(device, Preprocess.from_transforms(preprocessing_transforms()), 256, torch.float16)
        for batch in held_batches(jpeg_files(corpus, 40 * 256), 256):
            decoder.images(batch.pin_memory())
        torch.cuda.synchronize()
    print(f"exiting {time.monotonic()}", flush=True)
    if hard:
        os._exit(0)


def exit_seconds(step: str, corpus: Path, hard: bool) -> float:
    process = subprocess.Popen([sys.executable, __file__, str(corpus), "--child", step, *(["--hard"] if hard else [])],
                               stdout=subprocess.PIPE, text=True, env=repo_env())
    last = None
    for line in process.stdout:
        if line.startswith("exiting "):
            last = float(line.split()[1])
    process.wait()
    ended = time.monotonic()  # CLOCK_MONOTONIC is one clock for every process of the machine
    if process.returncode != 0 or last is None:
        raise SystemExit(f"the {step} child failed (exit {process.returncode})")
    return ended - last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--hard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.corpus, args.hard)
        return
    print(f"machine: {os.cpu_count()} cores", flush=True)
    for step in STEPS:
        for hard in (False, True):
            times = [exit_seconds(step, args.corpus, hard) for _ in range(args.repeats)]
            spread = ", ".join(f"{t:.2f}" for t in times)
            how = "os._exit" if hard else "return"
            print(f"{step:<14} {how:<9} exit {statistics.median(times):.2f} s ({spread})", flush=True)


if __name__ == "__main__":
    main()
