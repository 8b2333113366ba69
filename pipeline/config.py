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
DEFAULT_DECODE_TIMEOUT_S = 60.0  # a legitimate file decodes in seconds (a 40-megapixel PNG: 2.0 s on this
#   project's CPU machine, so about 9 s at the pixel limit); a hostile one (a progressive JPEG of thousands of
#   scans) can take minutes
DEFAULT_MAX_FILE_BYTES = 512 * 2**20  # an uncompressed 8-bit RGB image at the default pixel limit is about this
#   size; JPEG metadata, and on a GPU a whole JPEG, is held in memory, so this bounds what a file costs a worker


def default_workers() -> int:
    """Decode workers: one per core the process may use, capped at 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 16))


def _option(default=dataclasses.MISSING, *, identity: bool, **more):
    """A field of Config; identity: it changes what a row contains, so a resume must keep it (pipeline.prepare
    puts its resolved value in the run's identity); otherwise it may change between a run and its resume."""
    return dataclasses.field(default=default, metadata={"identity": identity}, **more)


@dataclass(frozen=True)
class Config:
    input_dir: Path | str | None = _option(identity=True)  # folder of images, listed recursively; a str: a URL
    #   prefix of an object store (s3://bucket/prefix/), listed the same way; None with input_list
    output_dir: Path = _option(identity=False)  # folder of Parquet shards, plan and manifest (where, not what)
    model: str = _option("resnet18", identity=True)  # an image classifier of torchvision's registry
    weights: str = _option("imagenet", identity=True)  # 'imagenet' or 'DEFAULT' (the model's default weights, from
    #   torchvision's cache), a weights name ('IMAGENET1K_V2'), 'random' (seeded) or a file
    labels: Path | None = _option(None, identity=True)  # one class name per line; needed when the model has != 1000
    #   classes
    device: str = _option("auto", identity=False)  # 'auto' (cuda when available), 'cpu' or 'cuda'; what it
    #   changes in a row (precision, decoder) is in the identity through precision and decode
    batch_size: int = _option(256, identity=False)  # images per model batch; the last batch may be smaller
    workers: int = _option(identity=False, default_factory=default_workers)  # DataLoader decode processes
    shard_size: int | None = _option(None, identity=False)  # rows per Parquet shard, the unit of commit and resume;
    #   None: the saved plan's when resuming, else DEFAULT_SHARD_SIZE (a resume always keeps the saved plan's)
    precision: str = _option("auto", identity=True)  # model precision: 'auto' (fp16 on a GPU, fp32 on the CPU),
    #   'fp32', 'fp16', 'bf16'
    decode: str = _option("auto", identity=True)  # JPEG decoding: 'auto' (nvJPEG on a GPU, Pillow otherwise) or
    #   'cpu' (always Pillow)
    topk: int = _option(5, identity=True)  # how many (label, probability) pairs go in the topk columns
    seed: int = _option(0, identity=True)  # seed of --weights random (part of the weights' fingerprint)
    progress: str = _option("auto", identity=False)  # 'auto' (bar at a terminal, log lines otherwise), 'bar', 'log'
    log_every_s: float = _option(30.0, identity=False)  # seconds between progress log lines when there is no bar
    partition: tuple[tuple[str, str], ...] = _option((), identity=False)  # Hive partition (key, value) pairs: the
    #   run lives in OUTPUT/key=value/... (where, not what); checked by pipeline.layout.parse_partition
    logits: str = _option("float32", identity=True)  # 'float32', 'float16' (rounded to half precision) or 'none'
    max_image_pixels: int = _option(DEFAULT_MAX_IMAGE_PIXELS, identity=True)  # larger images are error rows
    jpeg_draft: bool = _option(False, identity=True)  # CPU path: decode big JPEGs at reduced scale (Pillow's draft),
    #   faster but no longer the weights' own transforms pixel for pixel (docs/benchmarks.md)
    max_file_bytes: int = _option(DEFAULT_MAX_FILE_BYTES, identity=True)  # larger files are error rows, never read
    decode_timeout: float = _option(DEFAULT_DECODE_TIMEOUT_S, identity=True)  # seconds a decode worker may spend on
    #   one file: past it the worker is killed and the file is an error row (no limit with --workers 0)
    max_error_rate: float = _option(DEFAULT_MAX_ERROR_RATE, identity=False)  # a higher share of error rows: every
    #   row is committed, but the process exits 3 (TOO_MANY_ERRORS) so that cron and Slurm raise an alert
    incremental: bool = _option(False, identity=False)  # --incremental: classify only files new or changed since the
    #   newest finished partition of OUTPUT, and give deleted ones a `deleted` row (pipeline/nights.py); which rows
    #   a night has, not what a row contains
    fingerprint: str = _option("stat", identity=True)  # 'stat' (size and mtime) or 'content' (sha256 of the bytes,
    #   also recorded in each row): how a changed file is told (pipeline/fingerprint.py)
    input_list: Path | None = _option(None, identity=True)  # --input-list: a file naming the items (paths or URLs:
    #   text, one a line, or Parquet/CSV with a path column), instead of INPUT
    fetch_threads: int = _option(16, identity=False)  # GETs each decode worker keeps in flight (object stores)
    rank: int | None = _option(None, identity=False)  # --rank: this process's share of the plan is the shards k with
    #   k % world_size == rank; None: from Slurm or torchrun variables (pipeline.ranks), else 0
    world_size: int | None = _option(None, identity=False)  # --world-size: how many processes share the plan;
    #   None: as rank

    @property
    def run_dir(self) -> Path:
        """The folder of this run's shards and state: OUTPUT, or its Hive partition folder."""
        return self.output_dir.joinpath(*(f"{key}={value}" for key, value in self.partition))

    def to_json(self) -> dict:
        """The config as plain JSON values, for the run metadata."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def identity_options() -> list[str]:
    """The options that change what a row contains: a resume must give the same (docs/operations.md lists them)."""
    return [f.name for f in dataclasses.fields(Config) if f.metadata["identity"]]


def resumable_options() -> list[str]:
    """The options that may change between a run and its resume."""
    return [f.name for f in dataclasses.fields(Config) if not f.metadata["identity"]]


class Refused(Exception):
    """The run cannot start as asked (input, output, weights, labels, options, ranks): nothing was written, and the
    message names the fix. The command line exits 2."""
