#!/usr/bin/env python3
"""CPU benchmark: the whole job's throughput against the bare model's forward throughput.

    PYTHONPATH=. python scripts/bench_cpu.py --images 600 --batch-size 64 [--model resnet50]

The job is a whole process (`python -m pipeline classify`, start-up, decoding, writing and
committing included) over JPEG photos of ImageNet-like size; the bare model is the same model's
forward on random tensors of its crop size at the same batch size in this process. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from repo_env import REPO, repo_env
from synthetic import write_image
from torchvision.models import get_model, get_model_weights


def make_photos(folder: Path, count: int) -> None:
    """ImageNet-sized JPEGs: real photos when scripts/make_corpus.py has its sources, else smooth noise."""
    try:
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), "--out", str(folder), "--count",
                        str(count)], check=True, capture_output=True)
        return
    except subprocess.CalledProcessError:
        pass  # no scikit-image / scikit-learn here
    for i in range(count):
        write_image(folder / f"{i // 100:03d}" / f"{i:05d}.jpg", i, size=(500, 375), quality=90)


def bare_model(architecture: str, batch_size: int, images: int) -> float:
    model = get_model(architecture, weights=None).eval()
    size = get_model_weights(architecture).DEFAULT.transforms().crop_size[0]
    x = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        started = time.perf_counter()
        done = 0
        while done < images:
            model(x)
            done += batch_size
    return done / (time.perf_counter() - started)


def whole_job(folder: Path, out: Path, architecture: str, batch_size: int, workers: int) -> tuple[float, str]:
    env = repo_env()
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "classify", str(folder), str(out), "--model",
                             architecture, "--weights", "random", "--device", "cpu", "--batch-size", str(batch_size),
                             "--workers", str(workers), "--progress", "log"], env=env, capture_output=True, text=True,
                            check=True)
    seconds = time.perf_counter() - started
    summary = re.search(r"done: (.*)", result.stderr).group(1)
    return seconds, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="resnet18", help="any classifier of torchvision's registry")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_photos(folder, args.images)
        model_rate = bare_model(args.model, args.batch_size, args.images)
        seconds, summary = whole_job(folder, Path(tmp) / "out", args.model, args.batch_size, args.workers)
    job_rate = args.images / seconds
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"job summary: {summary}")
    print(f"{args.model} forward alone, batch {args.batch_size}: {model_rate:.1f} img/s")
    print(f"whole job ({args.images} images, whole process): {job_rate:.1f} img/s in {seconds:.1f} s")
    print(f"ratio: {job_rate / model_rate:.0%}")


if __name__ == "__main__":
    main()
