#!/usr/bin/env python3
"""GPU benchmark (issue 5): real-photo corpus, the job and the two baselines in one call.

    PYTHONPATH=. python3 scripts/bench.py --count 100000 --json $OUT/bench.json

Every figure is a whole process started here: wall time from spawn to exit, the time until the
job logs its first batch on the device, its steady rate (first batch to last commit, from its
summary line), peak RSS of the main process and of its process tree, and peak GPU memory (PyTorch's
allocator; for the big photos also the driver's count, nvidia-smi, which sees nvJPEG's own buffers).
Also checks the GPU path's logits against the CPU fp32 path on real photos (seeded weights with
non-trivial BatchNorm statistics). Prints a table last. `--only startup` times a job's start phase by
phase (scripts/bench_startup.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from bench_startup import print_startup, startup
from repo_env import REPO, repo_env

ENVIRONMENT = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF",
               "CUDA_VISIBLE_DEVICES")  # what changes the figures without changing the code: saved with them
MILESTONES = {"prepared_s": "pipeline.runner: torch and torchvision imported in",  # DEBUG: only under -v
              "planned_s": "INFO pipeline.runner: planned ",
              "model_on_device_s": "pipeline.infer: the model is on ",  # DEBUG
              "classifying_s": "INFO pipeline.runner: classifying ",  # the workers have started
              "workers_first_batch_s": "first batch from the workers",  # DEBUG
              "first_batch_s": "first batch on",
              "done_s": "INFO pipeline: done: images="}  # seconds from spawn to the job's log line that says so
IMPORTED = {"site": "python_started_s", "torch": "torch_imported_s", "torchvision": "torchvision_imported_s"}  # under
#   python -X importtime: seconds from spawn to the line that ends the module's first import


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


def _gpu_used_mib() -> float | None:
    """Memory in use on the machine's GPUs as the driver counts it: CUDA contexts and nvJPEG's own buffers too,
    which PyTorch's max_memory_reserved does not see. None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return sum(float(used) for used in out.split())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def run_process(args: list[str], log_path: Path, watch_gpu: bool = False) -> dict:
    """Run one whole process; time it, watch its memory (watch_gpu: the GPUs' too, with nvidia-smi), note when it
    logs its MILESTONES."""
    env = repo_env(PYTHONUNBUFFERED="1")
    gpu = {"before": _gpu_used_mib() if watch_gpu else None, "peak": None}
    started = time.monotonic()
    process = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen: dict = {**dict.fromkeys(MILESTONES), "summary": None}
    peaks = [0, 0]

    def read_stderr() -> None:
        with open(log_path, "w") as log:
            for line in process.stderr:
                log.write(line)
                if line.startswith("import time:"):
                    key = IMPORTED.get(line.rsplit("|", 1)[-1].strip())
                    if key is not None and key not in seen:
                        seen[key] = time.monotonic() - started
                    continue
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
        used = _gpu_used_mib() if watch_gpu else None
        if used is not None:
            gpu["peak"] = max(gpu["peak"] or 0.0, used)
        try:
            process.wait(timeout=0.2)  # not a sleep: the exit is timed to the millisecond
        except subprocess.TimeoutExpired:
            pass
    wall = time.monotonic() - started
    reader.join()
    result = {"rc": process.returncode, "wall_s": wall, **{key: seen[key] for key in MILESTONES},
              **{key: seen[key] for key in IMPORTED.values() if key in seen}, "main_rss_mib": peaks[0] / 1024,
              "tree_rss_mib": peaks[1] / 1024, "log": str(log_path)}
    if watch_gpu:
        result.update(gpu_used_before_mib=gpu["before"], gpu_used_peak_mib=gpu["peak"])
    if seen["summary"]:
        for key, value in re.findall(r"(\w+(?:/s)?)=([\d.]+)", seen["summary"]):
            result[key] = float(value)
    return result


def job(corpus: Path, out: Path, logs: Path, name: str, *options: str, python: tuple[str, ...] = (),
        watch_gpu: bool = False) -> dict:
    """One job from spawn to exit; python: the interpreter's own options (-X importtime)."""
    args = [sys.executable, *python, "-m", "pipeline", "classify", str(corpus), str(out), "--progress", "log",
            *options]
    result = run_process(args, logs / f"{name}.log", watch_gpu)
    result["images_per_s"] = result.get("images", 0) / result["wall_s"]
    return result


def baseline(recipe: str, corpus: Path, logs: Path, workers: int) -> dict:
    out = logs / f"{recipe}.npy"
    result = run_process([sys.executable, str(REPO / "scripts" / "baselines.py"), recipe, str(corpus), str(out),
                          "--workers", str(workers)], logs / f"{recipe}.log")
    result["images"] = len(np.load(out)) if out.exists() else 0
    result["images_per_s"] = result["images"] / result["wall_s"]
    return result


def corpus(root: Path, count: int, formats: str = "jpeg", width: str = "333-800") -> Path:
    folder = root / f"{formats.replace(',', '-')}-{count}-{width}"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), "--out", str(folder), "--count",
                    str(count), "--formats", formats, "--width", width], check=True)
    return folder


def logits_of(out: Path) -> np.ndarray:
    import pyarrow.dataset as ds

    table = ds.dataset(str(out), format="parquet").to_table().sort_by("path")
    return np.array(table["logits"].to_pylist(), dtype=np.float64)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Per-image cosine of two runs' logits and their top-1 agreement."""
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"images": len(a), "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_abs_logit_diff": float(abs(a - b).max())}


def big_photos(photos: Path, work: Path, logs: Path, workers: list[str]) -> dict:
    """2-12 megapixel JPEGs: the GPU path, the CPU decode path whole (the default) and with --jpeg-draft, and how
    far the draft's logits move (seeded non-trivial ResNet18 weights, CPU path both times)."""
    import torch
    from synthetic import nontrivial_state_dict

    weights = work / "big-resnet18.pt"
    torch.save(nontrivial_state_dict("resnet18"), weights)
    runs = {"gpu": [], "cpu-decode": ["--decode", "cpu"], "cpu-decode-draft": ["--decode", "cpu", "--jpeg-draft"]}
    result = {name: job(photos, work / f"out-big-{name}", logs, f"big-{name}", "--weights", str(weights), *options,
                        *workers, watch_gpu=True) for name, options in runs.items()}
    result["draft_vs_whole"] = compare(logits_of(work / "out-big-cpu-decode-draft"),
                                       logits_of(work / "out-big-cpu-decode"))
    return result


def model_alone(architecture: str, batch: int = 256, steps: int = 30) -> dict:
    """The model's own rate on the GPU: fp16, channels_last, fixed random batches already on the device (median of
    steps timed with CUDA events): the ceiling the whole job can approach for this model."""
    import torch
    from torchvision.models import get_model, get_model_weights

    net = get_model(architecture, weights=None).eval().to("cuda", torch.float16, memory_format=torch.channels_last)
    size = get_model_weights(architecture).DEFAULT.transforms().crop_size[0]
    x = torch.randn(batch, 3, size, size, device="cuda").to(torch.float16, memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for step in range(steps + 5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            net(x)
            end.record()
            end.synchronize()
            if step >= 5:
                times.append(start.elapsed_time(end) / 1000)
    return {"model": architecture, "batch": batch, "images_per_s": batch / float(np.median(times))}


def agreement(architecture: str, corpus_dir: Path, work: Path, logs: Path) -> dict:
    """Per-image cosine and top-1 agreement of the GPU path (fp16, nvJPEG where the model resizes bilinear)
    against the CPU fp32 path, seeded non-trivial weights of the model."""
    import torch
    from synthetic import nontrivial_state_dict

    weights = work / f"{architecture}.pt"
    torch.save(nontrivial_state_dict(architecture), weights)
    runs = {}
    for name, options in {"gpu": ["--device", "cuda"], "cpu": ["--device", "cpu", "--precision", "fp32"]}.items():
        out = work / f"agree-{architecture}-{name}"
        job(corpus_dir, out, logs, f"agree-{architecture}-{name}", "--model", architecture, "--weights", str(weights),
            *options)
        runs[name] = logits_of(out)
    return {"model": architecture, **compare(runs["gpu"], runs["cpu"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000, help="images in the main corpus")
    parser.add_argument("--small", type=int, default=20_000, help="images in the corpus for baselines and memory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--job-options", default="", help="extra options for the job runs, e.g. --decode cpu")
    parser.add_argument("--only", default="job,agree,cpu-decode,png,small,plain,timm,models,big",
                        help="comma list of the runs to do; also 'startup' (scripts/bench_startup.py), not by default")
    parser.add_argument("--models", default="resnet18,resnet50,efficientnet_b0,vit_b_16",
                        help="for the run 'models': each model's job on the small corpus (--model M), its forward "
                             "rate alone, and its GPU-path agreement with the CPU fp32 path")
    parser.add_argument("--agree-count", type=int, default=1000, help="photos in the agreement corpus")
    parser.add_argument("--big", type=int, default=2000, help="2-12 megapixel photos in the corpus of the run 'big'")
    parser.add_argument("--startup-count", type=int, default=2000, help="photos of each job of the run 'startup'")
    parser.add_argument("--startup-runs", type=int, default=3, help="timed jobs of the run 'startup', per variant")
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
    big = functools.partial(corpus, args.work, args.count)  # made by the first run that needs it: --only big or
    small = functools.partial(corpus, args.work, args.small)  # --only startup make no 100,000 photos first
    workers = ["--workers", str(args.workers), *args.job_options.split()]
    runs = [
        ("job", lambda: job(big(), args.work / "out-job", logs, "job", "--weights", "random", *workers)),
        ("small", lambda: job(small(), args.work / "out-small", logs, "small", "--weights", "random", *workers)),
        ("cpu-decode", lambda: job(small(), args.work / "out-cpu", logs, "cpu-decode", "--weights", "random",
                                   "--decode", "cpu", *workers)),
        ("png", lambda: job(corpus(args.work, args.small // 2, "png,webp"), args.work / "out-png", logs, "png",
                            "--weights", "random", *workers)),
        ("agree", lambda: agreement("resnet18", corpus(args.work, args.agree_count), args.work, logs)),
        ("big", lambda: big_photos(corpus(args.work, args.big, width="1600-4000"), args.work, logs, workers)),
        ("plain", lambda: baseline("plain", big(), logs, args.workers)),
        ("timm", lambda: baseline("timm", big(), logs, args.workers)),
        ("startup", lambda: startup(corpus(args.work, args.startup_count), args.work, logs, job, args.startup_runs,
                                    workers)),
    ]
    if "models" in only:
        for arch in args.models.split(","):
            runs += [(f"model-{arch}", lambda arch=arch: job(small(), args.work / f"out-model-{arch}", logs,
                                                             f"model-{arch}", "--model", arch, "--weights", "random",
                                                             *workers)),
                     (f"alone-{arch}", lambda arch=arch: model_alone(arch)),
                     (f"agree-{arch}", lambda arch=arch: agreement(arch, corpus(args.work, args.agree_count),
                                                                        args.work, logs))]
            only |= {f"model-{arch}", f"alone-{arch}", f"agree-{arch}"}
    for name, run in runs:
        if name in only:
            for out in args.work.glob(f"out-{name}*"):
                subprocess.run(["rm", "-rf", str(out)], check=True)
            results[name] = run()
            print(name, json.dumps(results[name]), flush=True)
            if args.json:  # after every run: a call cut short still leaves what it measured
                args.json.write_text(json.dumps(results, indent=1))
    rows = {**{name: r for name, r in results.items() if isinstance(r, dict)},
            **{f"big/{sub}": r for sub, r in results.get("big", {}).items()}}
    print(f"\n{'run':<24}{'images':>8}{'wall s':>8}{'img/s':>9}{'steady':>9}{'1st s':>7}{'rss MiB':>9}"
          f"{'tree MiB':>10}{'gpu GiB':>8}{'plan s':>8}{'smi GiB':>8}")
    for name, r in rows.items():
        if "wall_s" in r:
            print(f"{name:<24}{r.get('images', 0):>8.0f}{r['wall_s']:>8.1f}{r['images_per_s']:>9.0f}"
                  f"{r.get('steady_img/s', 0):>9.0f}{r.get('first_batch_s') or 0:>7.1f}{r['main_rss_mib']:>9.0f}"
                  f"{r['tree_rss_mib']:>10.0f}{r.get('gpu_peak_gib', 0):>8.2f}{r.get('planned_s') or 0:>8.1f}"
                  f"{(r.get('gpu_used_peak_mib') or 0) / 1024:>8.2f}")
    for name, r in rows.items():
        if name.startswith("alone-"):
            print(f"{name:<24} model alone, fp16 batch {r['batch']}: {r['images_per_s']:.0f} img/s")
        if name.startswith("agree"):
            print(f"{name:<24} GPU path vs CPU fp32:", json.dumps(r))
        if name == "big/draft_vs_whole":
            print(f"{name:<24} --jpeg-draft vs whole decode (CPU path):", json.dumps(r))
    if "startup" in results:
        print_startup(results["startup"])

if __name__ == "__main__":
    main()
