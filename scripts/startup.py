#!/usr/bin/env python3
"""Where the job's start-up goes, and what the model costs the host per batch (issue 5).

    PYTHONPATH=. python3 scripts/startup.py [--json FILE] [--corpus DIR]

1. Imports, each in a fresh interpreter (median of 3): bare python, torch, torch + torchvision,
   and pipeline.runner (everything the job imports).
2. In one fresh process per cudnn setting: CUDA start, model build and move, the first forward
   at batch 256 in fp16 channels_last and the steady forward rate, and nvJPEG's first and second
   decode of a tiny JPEG (the first starts the library).
3. With --corpus, in fresh processes: listing the corpus (the plan's first step), starting CUDA,
   and both at once with CUDA started on a thread: does CUDA's start overlap the listing?
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from repo_env import repo_env

IMPORTS = {"python": "pass", "torch": "import torch", "torch+torchvision": "import torch, torchvision",
           "pipeline.runner": "import pipeline.runner"}


def import_seconds(statement: str, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, env=repo_env())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def model_startup(benchmark: bool) -> dict:
    """Run in a child process: the start-up steps of the model with cudnn.benchmark on or off."""
    out = subprocess.run([sys.executable, __file__, "--child", str(int(benchmark))], check=True, env=repo_env(),
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _child(benchmark: bool) -> None:
    import torch

    from pipeline.decode import Preprocess
    from pipeline.gpu_decode import GpuDecoder
    from pipeline.infer import Classifier
    from pipeline.model import build_model, preprocessing_transforms, resolve_weights

    steps, mark = {}, time.perf_counter()

    def step(name: str) -> None:
        nonlocal mark
        torch.cuda.synchronize()
        now = time.perf_counter()
        steps[name] = now - mark
        mark = now

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    step("cuda_start_s")
    transforms = preprocessing_transforms()
    net = build_model(resolve_weights("random", 0))
    step("build_model_s")
    classifier = Classifier(net, device, transforms.mean, transforms.std, 5, torch.float16)
    torch.backends.cudnn.benchmark = benchmark
    step("to_device_s")
    images = torch.randint(0, 256, (256, 3, 224, 224), device=device).half()
    with torch.inference_mode():
        classifier.forward(images)
        step("first_forward_s")
        for _ in range(5):
            classifier.forward(images)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            classifier.forward(images)
        torch.cuda.synchronize()
        steps["forward_images_per_s"] = 50 * 256 / (time.perf_counter() - started)
        mark = time.perf_counter()
        decoder = GpuDecoder(device, Preprocess.from_transforms(transforms), 256, torch.float16)
        decoder.warm_up()
        step("nvjpeg_first_decode_s")
        decoder.warm_up()
        step("nvjpeg_second_decode_s")
    print(json.dumps(steps))


def _overlap_child(what: str, corpus: str) -> None:
    import threading

    import torch

    from pipeline.plan import list_images

    def cuda_start() -> None:
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()

    started = time.perf_counter()
    if what == "cuda":
        cuda_start()
    elif what == "list":
        list_images(Path(corpus))
    else:
        thread = threading.Thread(target=cuda_start)
        thread.start()
        list_images(Path(corpus))
        listed = time.perf_counter() - started
        thread.join()
        print(json.dumps({"list_s": listed, "both_s": time.perf_counter() - started}))
        return
    print(json.dumps({f"{what}_s": time.perf_counter() - started}))


def overlap(corpus: Path) -> dict:
    """Medians of 3 fresh processes each: list alone, CUDA start alone, CUDA on a thread while listing."""
    results = {}
    for what in ("list", "cuda", "both"):
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--overlap-child", what, str(corpus)],
                                          check=True, env=repo_env(), capture_output=True, text=True).stdout)
                for _ in range(3)]
        results[what] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--corpus", type=Path, help="also time the listing of this folder against CUDA's start")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overlap-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return _child(bool(args.child))
    if args.overlap_child is not None:
        return _overlap_child(*args.overlap_child)
    results = {"imports_s": {name: import_seconds(code) for name, code in IMPORTS.items()}}
    for benchmark in (True, False):
        results[f"cudnn_benchmark_{benchmark}"] = model_startup(benchmark)
    if args.corpus:
        results["list_and_cuda"] = overlap(args.corpus)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
