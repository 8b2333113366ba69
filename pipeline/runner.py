"""Wire the stages: list → plan → read/decode → batch → infer → write → commit. Owns nothing else."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import PIL
import pyarrow as pa
import torch
import torchvision

from pipeline import commit, decode, failures, finish, guard, infer, layout, leftovers, model, plan, ranks, stop
from pipeline.config import DEFAULT_SHARD_SIZE, Config
from pipeline.gpu_decode import GpuDecoder
from pipeline.progress import Progress, Waiting
from pipeline.writer import SCHEMA_VERSION, ShardWriter

_logger = logging.getLogger(__name__)


class PlanMismatch(Exception):
    """The output folder was started with another input or other weights."""


@dataclass
class Summary:
    images: int  # rows of this process's shards (a single process: the whole plan), every image, ok or error
    ok: int
    errors: int
    seconds: float  # wall time of the run, from the runner's start
    images_this_run: int  # images classified by this process (0 when resuming a finished output)
    steady_seconds: float = 0.0  # from the first batch on the device to the last commit
    gpu_peak_gib: float = 0.0  # peak memory the caching allocator held on the GPU
    error_counts: dict[str, int] = field(default_factory=dict)  # error rows by cause, whole output
    first_failures: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of the first few
    max_error_rate: float = 1.0

    def line(self) -> str:
        rate = self.images_this_run / max(self.seconds, 1e-9)
        steady = self.images_this_run / max(self.steady_seconds, 1e-9)
        return (f"images={self.images} ok={self.ok} errors={self.errors} seconds={self.seconds:.1f} "
                f"img/s={rate:.1f} steady_img/s={steady:.1f} gpu_peak_gib={self.gpu_peak_gib:.2f} "
                f"(this run: {self.images_this_run} images)")

    @property
    def too_many_errors(self) -> bool:
        """More error rows than --max-error-rate allows, over this process's shards (a single process: all of them)."""
        return self.errors > self.max_error_rate * self.images

    def error_lines(self) -> list[str]:
        """Counts by cause and the first failed files, for the log."""
        if not self.errors:
            return []
        causes = ", ".join(f"{cause}: {count}" for cause, count in self.error_counts.items())
        first = "; ".join(f"{path} ({error})" for path, error in self.first_failures)
        return [f"errors by cause: {causes}", f"first failed files: {first}"]


def _open_plan(config: Config, identity: dict) -> plan.Plan:
    """The output's plan: the saved one when resuming (checked against identity), else a new one."""

    def fresh() -> plan.Plan:
        layout.check_no_unfinished_twin(config.output_dir, config.partition, identity)
        listing = plan.list_images(config.input_dir)
        return plan.new_plan(listing, config.shard_size or DEFAULT_SHARD_SIZE, identity)

    saved, planned = plan.open_plan(config.run_dir, fresh)  # one process plans, however many start at once
    if planned:
        _logger.info("planned %d images in %d shards (%d other files ignored), run id %s",
                     len(saved.paths), saved.shard_count, saved.facts["ignored_files"], saved.run_id)
        return saved
    for key, value in identity.items():
        if saved.facts.get(key) != value:
            raise PlanMismatch(
                f"{config.run_dir} was started with {key}={saved.facts.get(key)!r}, not {value!r}: "
                "resume with the same input, weights and --logits, or write to a new OUTPUT folder"
            )
    if config.shard_size not in (None, saved.shard_size):
        _logger.warning("keeping the saved plan's shard size %d (asked for %d)", saved.shard_size, config.shard_size)
    return saved


def _run_facts(the_plan: plan.Plan, net: torch.nn.Module, transforms, config: Config) -> dict:
    """What every shard's metadata and the manifest say about the run."""
    return {
        **the_plan.facts,
        "schema_version": SCHEMA_VERSION,
        "partition": dict(config.partition),
        "model": "torchvision.models.resnet18",
        "classes": net.fc.out_features,
        "preprocessing": repr(transforms),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__, "pyarrow": pa.__version__},
    }


def _summary(records: dict[int, dict], total: int, started: float, images_this_run: int, config: Config) -> Summary:
    ok = sum(record["status_counts"].get("ok", 0) for record in records.values())
    errors = sum(record["status_counts"].get("error", 0) for record in records.values())
    causes: Counter[str] = Counter()
    for record in records.values():
        causes.update(record.get("error_counts", {}))
    first = failures.first_failures(config.run_dir) if errors else []
    return Summary(total, ok, errors, time.monotonic() - started, images_this_run,
                   error_counts=dict(sorted(causes.items())), first_failures=first,
                   max_error_rate=config.max_error_rate)


def _finish(out: Path, the_plan: plan.Plan, rank: ranks.Rank) -> None:
    """Publish _SUCCESS when every shard is committed, whichever process committed them."""
    ended = finish.finish(out, the_plan)
    if not ended.finished and rank.world_size == 1:
        raise RuntimeError(f"every shard was committed but {ended.line(the_plan)}: run the same command again")
    _logger.info("%s", ended.line(the_plan))


def run(config: Config) -> Summary:
    """Classify what is not yet committed (this rank's share), holding the run folder's locks (ranks.hold); a stop
    signal raises stop.Interrupted."""
    started = time.monotonic()
    rank = ranks.detect(os.environ, config.rank, config.world_size)
    if rank.world_size > 1:
        _logger.info("this process is %s", rank.describe())
    plan.check_input(config.input_dir)
    layout.check_layout(config.output_dir, config.partition)
    out = config.run_dir  # OUTPUT, or its partition folder: shards, plan, records and manifest all live here
    out.mkdir(parents=True, exist_ok=True)
    with ranks.hold(out, rank), stop.on_signals() as stopping:
        if rank.world_size == 1:
            leftovers.remove_temp_files(out)  # we are the only writer here: every temp file is a dead run's
        return _run(config, out, rank, stopping, started)


def _run(config: Config, out: Path, rank: ranks.Rank, stopping: stop.Stop, started: float) -> Summary:
    source = model.resolve_weights(config.weights, config.seed)
    identity = {"input_dir": str(config.input_dir.resolve()), **source.facts(),
                "schema_version": SCHEMA_VERSION, "logits": config.logits}
    the_plan = _open_plan(config, identity)
    shards = rank.shards(the_plan.shard_count)  # all of them for a single process
    if rank.world_size > 1:  # other ranks write beside us: only the temp files of our own shards are a dead run's
        leftovers.remove_temp_files(out, {name for shard in shards for name in commit.file_names(the_plan, shard)})
    records = commit.committed_records(out, the_plan, shards)
    pending = [shard for shard in shards if shard not in records]
    rows = sum(len(the_plan.shard_range(shard)) for shard in shards)

    net = model.build_model(source)
    names = model.class_names(net.fc.out_features, config.labels)
    transforms = model.preprocessing_transforms()
    run_facts = _run_facts(the_plan, net, transforms, config)
    if not pending:
        _logger.info("nothing to do: all %d shards are committed", len(shards))
        _finish(out, the_plan, rank)
        return _summary(records, rows, started, 0, config)

    device = infer.pick_device(config.device, rank.local_rank)
    _logger.debug("device %s ready", device)
    preprocess = decode.Preprocess.from_transforms(transforms)
    gpu = device.type == "cuda"
    dtype = infer.pick_precision(config.precision, device)
    decoder = GpuDecoder(device, preprocess, config.batch_size, dtype) if gpu else None
    classifier = infer.Classifier(net, device, transforms.mean, transforms.std, config.topk, dtype, decoder)
    indices = [index for shard in pending for index in the_plan.shard_range(shard)]
    dataset = decode.ImageFiles(config.input_dir, the_plan, indices, preprocess,
                                gpu_jpeg=gpu and config.decode == "auto", max_pixels=config.max_image_pixels)
    batches = stopping.batches(guard.batches(dataset, config.batch_size, config.workers, pin_memory=gpu))  # the
    #   workers start now; a worker's death costs its file a row, not the run; a stop signal ends the batches,
    #   and the workers with them
    _logger.debug("%d workers started", config.workers)
    classifier.start_warm_up()  # nvJPEG's and the model's first calls, about 1.4 s, go by while the workers read
    #   the first batch. Only once the workers have forked: started before, a job hung on an H100, likely a
    #   worker forked while a thread held a lock (CUDA libraries load lazily on first calls)
    _logger.info("classifying %d images (%d shards) on %s with %d workers, %d already committed",
                 len(indices), len(pending), device, config.workers, rows - len(indices))

    metadata = {**run_facts, "config": config.to_json(), "rank": dataclasses.asdict(rank)}
    writer = ShardWriter(out, the_plan, names, metadata, config.logits)
    progress = Progress(rows, rows - len(indices), config.progress, config.log_every_s)
    reading = Waiting()
    try:
        for scored in classifier.score(reading.wrap(batches)):
            writer.add(scored)
            progress.update(len(scored.batch.errors), sum(e is not None for e in scored.batch.errors))
    finally:
        writer.close()
        progress.close()
    records.update(writer.committed)
    stopping.check(len(records), len(shards))
    _finish(out, the_plan, rank)
    summary = _summary(records, rows, started, progress.images_this_run, config)
    summary.steady_seconds = time.monotonic() - (classifier.first_launch or started)
    _logger.info("waited %.1f s of %.1f s for decoded batches from the workers", reading.seconds,
                 summary.steady_seconds)
    if gpu:
        summary.gpu_peak_gib = torch.cuda.max_memory_reserved(device) / 2**30
    return summary
