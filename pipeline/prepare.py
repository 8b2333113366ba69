"""Check what a run needs that can be checked without running the model, before anything is written: the weights,
the labels, the options against the model, the device; and derive the run's identity from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode

from pipeline import model
from pipeline.config import Config, Refused
from pipeline.parquet import SCHEMA_VERSION
from pipeline.plan import differing_keys
from pipeline.source import PATH_ENCODING

_logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROCESS_BYTES = 2**30  # the main process at rest: torch, the model, the plan (about 0.75 GB measured on the CPU)
BATCHES_BESIDE_PREFETCH = 3  # batches alive beyond the workers' prefetch: being collated, on the model, read back


class PlanMismatch(Refused):
    """The run folder was started with another identity (input, model, options that change a row)."""


@dataclass
class Prepared:
    """Everything checked: what the runner needs to classify, and the identity a resume must match."""

    model: model.Model
    device: str  # 'cuda' or 'cpu'
    dtype: torch.dtype
    gpu_jpeg: bool  # plain JPEGs are decoded by nvJPEG on the GPU
    identity: dict  # every resolved option that changes what a row contains (config.identity_options)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise Refused("--device cuda was asked for but no CUDA GPU is visible to this process: use --device cpu or "
                      "auto, or run it where a GPU is (check CUDA_VISIBLE_DEVICES and nvidia-smi)")
    return name


def prepare(config: Config, source) -> Prepared:
    """The model built and checked, the options resolved against it and the device; raises Refused naming the fix."""
    built = model.load(config.model, config.weights, config.seed, config.labels)
    if config.topk > built.classes:
        raise Refused(f"--topk {config.topk} is more than the model's {built.classes} classes: pass --topk "
                      f"{built.classes} or less")
    device = _device(config.device)
    check_batch_memory(config, built, device, host_memory_available())
    precision = config.precision if config.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    bilinear = built.transforms.interpolation == InterpolationMode.BILINEAR
    gpu_jpeg = device == "cuda" and config.decode == "auto" and bilinear  # the GPU resize is bilinear only
    if device == "cuda" and config.decode == "auto" and not bilinear:
        _logger.info("%s's transforms resize with %s interpolation, which the GPU path does not do: every image is "
                     "decoded and resized by Pillow in the workers", config.model, built.transforms.interpolation.value)
    identity = {
        "input_dir": source.describe(),
        **built.identity(),
        "precision": precision,
        "decode": "nvjpeg" if gpu_jpeg else "pillow",
        "topk": config.topk,
        "logits": config.logits,
        "max_image_pixels": config.max_image_pixels,
        "jpeg_draft": config.jpeg_draft,
        "max_file_bytes": config.max_file_bytes,
        "decode_timeout": config.decode_timeout,
        "fingerprint": config.fingerprint,
        "schema_version": SCHEMA_VERSION,
        "path_encoding": PATH_ENCODING,  # how `path` spells names that are not plain UTF-8 (docs/schema.md)
    }
    return Prepared(built, device, PRECISIONS[precision], gpu_jpeg, identity)


def batch_bytes(config: Config, built: model.Model, device: str) -> tuple[int, int]:
    """(bytes every image of a batch costs the host, batches in flight): decoded uint8 images in the batches the
    workers prefetch and those beside them, and on the CPU the model's forward."""
    from pipeline.decode import PREFETCH

    crop = built.transforms.crop_size[0]
    in_flight = config.workers * PREFETCH + BATCHES_BESIDE_PREFETCH
    per_image = 3 * crop * crop * in_flight + (built.cpu_bytes_per_image(crop) if device == "cpu" else 0)
    return per_image, in_flight


def check_batch_memory(config: Config, built: model.Model, device: str, available: int | None) -> None:
    """Refuse a --batch-size whose batches in flight would not fit in the host memory available, naming the largest
    that fits (a batch that does not fit ends in the allocator's failure, after work and writes)."""
    if available is None:
        return
    per_image, in_flight = batch_bytes(config, built, device)
    need = PROCESS_BYTES + per_image * config.batch_size
    if need <= available:
        return
    fits = (available - PROCESS_BYTES) // per_image
    fix = (f"use --batch-size {fits} or less" if fits >= 1 else "free memory") + " (or fewer --workers)"
    raise Refused(f"--batch-size {config.batch_size} needs about {need / 2**30:.1f} GiB of host memory ({in_flight} "
                  f"batches in flight with --workers {config.workers}{', and the model on the CPU' * (device == 'cpu')}"
                  f"), but {available / 2**30:.1f} GiB is available here (MemAvailable, or the cgroup's limit): "
                  f"{fix}")


def host_memory_available() -> int | None:
    """Bytes this process may still take: the kernel's MemAvailable, or less under a cgroup memory limit (Slurm's
    --mem, a container's); None when neither can be read."""
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        found.append(int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024)
    except (OSError, IndexError, ValueError):
        pass
    for limit, usage, reclaimable in _cgroup_files():
        try:
            cap = (limit.read_text().strip(), int(usage.read_text()))
            stat = dict(line.split() for line in reclaimable.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if cap[0].isdigit() and int(cap[0]) < 2**60:  # 'max' (v2) or about 2**63 (v1): no limit
            inactive = int(stat.get("inactive_file", stat.get("total_inactive_file", 0)))  # page cache it can drop
            found.append(int(cap[0]) - cap[1] + inactive)
    return min(found) if found else None


def _cgroup_files() -> list[tuple[Path, Path, Path]]:
    """(limit, usage, stat) files of this process's memory cgroup, v2 and v1, at its path and at the root of the
    hierarchy (inside a container, its own cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":
            root, names = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "memory.stat")
        elif "memory" in controllers.split(","):
            root, names = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                          "memory.stat")
        else:
            continue
        for folder in (root / where.lstrip("/"), root):
            if folder.is_dir():
                files.append(tuple(folder / name for name in names))
    return files


def check_resume(saved: dict, identity: dict, where: str) -> None:
    """Refuse to resume a run folder whose plan was made with another identity: its rows would mix two contents."""
    changed = differing_keys(saved, identity)
    if not changed:
        return
    key = changed[0]
    if key not in saved:
        raise PlanMismatch(f"{where} was started by an older version of this job (its plan does not record "
                           f"{key}): finish it with that version, or write to a new OUTPUT")
    raise PlanMismatch(f"{where} was started with {key}={saved[key]!r}, not {identity[key]!r}: resume with the same "
                       "input, model, weights, labels and options that change a row (docs/operations.md lists them), "
                       "or write to a new OUTPUT")
