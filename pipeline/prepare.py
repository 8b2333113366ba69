"""Check what a run needs that can be checked without running the model, before anything is written: the weights,
the labels, the options against the model, the device; and derive the run's identity from the config."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline import model
from pipeline.config import Config, Refused
from pipeline.parquet import SCHEMA_VERSION
from pipeline.source import PATH_ENCODING, LocalFolder

_logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def prepare(config: Config, source: LocalFolder) -> Prepared:
    """The model built and checked, the options resolved against it and the device; raises Refused naming the fix."""
    built = model.load(config.weights, config.seed, config.labels)
    if config.topk > built.classes:
        raise Refused(f"--topk {config.topk} is more than the model's {built.classes} classes: pass --topk "
                      f"{built.classes} or less")
    device = _device(config.device)
    precision = config.precision if config.precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    gpu_jpeg = device == "cuda" and config.decode == "auto"
    identity = {
        "input_dir": source.describe(),
        **built.identity(),
        "precision": precision,
        "decode": "nvjpeg" if gpu_jpeg else "pillow",
        "topk": config.topk,
        "logits": config.logits,
        "max_image_pixels": config.max_image_pixels,
        "max_file_bytes": config.max_file_bytes,
        "schema_version": SCHEMA_VERSION,
        "path_encoding": PATH_ENCODING,  # how `path` spells names that are not plain UTF-8 (docs/schema.md)
    }
    return Prepared(built, device, PRECISIONS[precision], gpu_jpeg, identity)


def check_resume(saved: dict, identity: dict, where: str) -> None:
    """Refuse to resume a run folder whose plan was made with another identity: its rows would mix two contents."""
    for key, value in identity.items():
        if key not in saved:
            raise PlanMismatch(f"{where} was started by an older version of this job (its plan does not record "
                               f"{key}): finish it with that version, or write to a new OUTPUT")
        if saved[key] != value:
            raise PlanMismatch(f"{where} was started with {key}={saved[key]!r}, not {value!r}: resume with the same "
                               "input, weights, labels and options that change a row (--precision, --decode, --topk, "
                               "--logits, --max-image-pixels, --max-file-bytes, --seed), or write to a new OUTPUT")
