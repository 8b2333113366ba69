"""The one frozen configuration of a run: built by the CLI, passed down, saved with the output."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # where Pillow refuses by default: 2 x Image.MAX_IMAGE_PIXELS (it only
#   warns between 1x and 2x); a test keeps the two equal
DEFAULT_MAX_ERROR_RATE = 0.05


def default_workers() -> int:
    """Decode workers: one per core the process may use, capped at 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


@dataclass(frozen=True)
class Config:
    input_dir: Path  # folder of images, listed recursively
    output_dir: Path  # folder of Parquet shards, plan and manifest
    weights: str = "imagenet"  # 'imagenet' (torchvision cache), 'random' (seeded) or a file path
    labels: Path | None = None  # one class name per line; needed when the model has != 1000 classes
    device: str = "auto"  # 'auto' (cuda when available), 'cpu' or 'cuda'
    batch_size: int = 256  # images per GPU batch; the last batch of a run may be smaller
    workers: int = dataclasses.field(default_factory=default_workers)  # DataLoader decode processes
    shard_size: int | None = None  # rows per Parquet shard, the unit of commit and resume; None: the
    #   saved plan's when resuming, else DEFAULT_SHARD_SIZE
    precision: str = "auto"  # model precision: 'auto' (fp16 on a GPU, fp32 on the CPU), 'fp32', 'fp16', 'bf16'
    decode: str = "auto"  # JPEG decoding: 'auto' (nvJPEG on a GPU, Pillow otherwise) or 'cpu' (always Pillow)
    topk: int = 5  # how many (label, probability) pairs go in the topk columns
    seed: int = 0  # seed of --weights random
    progress: str = "auto"  # 'auto' (bar at a terminal, log lines otherwise), 'bar' or 'log'
    log_every_s: float = 30.0  # seconds between progress log lines when there is no bar
    partition: tuple[tuple[str, str], ...] = ()  # Hive partition (key, value) pairs: the run lives in
    #   OUTPUT/key=value/...; checked by pipeline.layout.parse_partition
    logits: str = "float32"  # 'float32', 'float16' (rounded to half precision) or 'none' (null logits column)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images are error rows, refused from the header
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # a higher share of error rows: every row is committed, but
    #   the process exits 3 (TOO_MANY_ERRORS) so that cron and Slurm raise an alert
    rank: int | None = None  # --rank: this process's share of the plan is the shards k with k % world_size == rank;
    #   None: from Slurm or torchrun variables (pipeline.ranks), else 0
    world_size: int | None = None  # --world-size: how many processes share the plan; None: as rank

    @property
    def run_dir(self) -> Path:
        """The folder of this run's shards and state: OUTPUT, or its Hive partition folder."""
        return self.output_dir.joinpath(*(f"{key}={value}" for key, value in self.partition))

    def to_json(self) -> dict:
        """The config as plain JSON values, for the run metadata."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
