"""Wire the stages: check → lock → plan → read/decode → batch → infer → write → commit → finish. Owns nothing else.

The order is the contract: everything that can be checked without running the model is checked before anything is
written in OUTPUT; a busy OUTPUT is refused before torch is imported (this module imports no torch at its top: the
stages that need it are imported once the checks that do not have passed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline import failures, fingerprint, finish, layout, lock, nights, ranks
from pipeline.config import DEFAULT_SHARD_SIZE, Config, Refused
from pipeline.durable import WriteError
from pipeline.parquet import DELETED
from pipeline.plan import Plan, new_plan
from pipeline.runfolder import RunFolder
from pipeline.source import open_source

_logger = logging.getLogger(__name__)


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
    unlisted_folders: dict[str, int] = field(default_factory=dict)  # folders below INPUT not listed, by cause
    unlisted_folder_paths: list[dict] = field(default_factory=list)  # the first few: path and error
    deleted: int = 0  # `deleted` rows: files gone since the night an incremental night compared with

    def line(self) -> str:
        rate = self.images_this_run / max(self.seconds, 1e-9)
        steady = self.images_this_run / max(self.steady_seconds, 1e-9)
        return (f"images={self.images} ok={self.ok} errors={self.errors} deleted={self.deleted} "
                f"unlisted_folders={sum(self.unlisted_folders.values())} seconds={self.seconds:.1f} "
                f"img/s={rate:.1f} steady_img/s={steady:.1f} gpu_peak_gib={self.gpu_peak_gib:.2f} "
                f"(this run: {self.images_this_run} images)")

    @property
    def too_many_errors(self) -> bool:
        """More error rows than --max-error-rate allows, over this process's shards (a single process: all of them)."""
        return self.errors > self.max_error_rate * self.images

    def error_lines(self) -> list[str]:
        """Counts by cause and the first failed files and folders not listed, for the log."""
        lines = []
        if self.errors:
            causes = ", ".join(f"{cause}: {count}" for cause, count in self.error_counts.items())
            first = "; ".join(f"{path} ({error})" for path, error in self.first_failures)
            lines += [f"errors by cause: {causes}", f"first failed files: {first}"]
        if self.unlisted_folders:
            causes = ", ".join(f"{cause}: {count}" for cause, count in self.unlisted_folders.items())
            first = "; ".join(f"{folder['path']} ({folder['error']})" for folder in self.unlisted_folder_paths[:5])
            lines += [f"folders not listed (their files have no rows), by cause: {causes}",
                      f"first folders not listed: {first}"]
        return lines


def run(config: Config) -> Summary:
    """Classify what is not yet committed (this rank's share), holding the run folder's locks (ranks.hold); a stop
    signal raises stop.Interrupted."""
    started = time.monotonic()
    rank = ranks.detect(os.environ, config.rank, config.world_size)
    if rank.world_size > 1:
        _logger.info("this process is %s", rank.describe())
    source = open_source(config)  # a local folder, an object-store prefix or a list file
    source.check()
    layout.check_output(config.run_dir)
    layout.check_layout(config.output_dir, config.partition)
    folder = RunFolder(config.run_dir)
    ranks.refuse_if_busy(folder, rank)  # a second run on a busy OUTPUT is refused here, in well under a second

    from pipeline import stop  # signals only, no torch

    with stop.on_signals():  # a stop signal from here on (Slurm's USR1 while torch imports, say) ends the process
        #   with exit 75 (nothing is written yet), not with the signal's default death, which a requeue would miss
        importing = time.monotonic()
        from pipeline.imports import import_torch

        import_torch()  # torchvision without torch._dynamo: seconds off every start
        from pipeline import prepare

        imported = time.monotonic()
        prepared = prepare.prepare(config, source)  # the model and every option checked: still nothing written
        _logger.debug("torch and torchvision imported in %.2f s, the model built and the options checked in %.2f s",
                      imported - importing, time.monotonic() - imported)
        if not folder.has_plan():  # refused before any write here; checked again where the night is planned
            layout.check_no_unfinished_twin(config.output_dir, config.partition, prepared.identity)
        try:
            config.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise WriteError(config.run_dir, error) from error
        with ranks.hold(folder, rank), stop.on_signals() as stopping:
            return _run(config, source, folder, rank, prepared, stopping, started)


def plan_run(config: Config, source, folder: RunFolder, identity: dict) -> Plan:
    """A new plan for the run folder: every listed file, or an incremental night's changes (pipeline.nights); a
    partitioned run publishes its listing first, for the next night."""
    layout.check_no_unfinished_twin(config.output_dir, config.partition, identity)
    listing = source.list()
    if config.fingerprint == fingerprint.CONTENT:
        listing.sha256 = fingerprint.hash_all(lambda path: source.open(path), listing.paths)
    if not config.partition:
        return new_plan(listing, config.shard_size or DEFAULT_SHARD_SIZE, identity)
    night = nights.plan_night(listing, config.output_dir, config.partition, identity, config.fingerprint,
                              config.incremental)
    folder.publish_listing(nights.listing_bytes(night.state))
    the_plan = new_plan(night.work, config.shard_size or DEFAULT_SHARD_SIZE, identity, night.deleted)
    the_plan.facts.update(night.facts)
    return the_plan


def _open_plan(config: Config, source, folder: RunFolder, identity: dict) -> Plan:
    """The run folder's plan: the saved one when resuming (its identity checked), else a new one."""
    from pipeline.prepare import check_resume

    started = time.monotonic()

    def fresh() -> Plan:
        return plan_run(config, source, folder, identity)

    if config.partition and not folder.has_plan():  # one night plans at a time in OUTPUT: a night planned beside
        #   another would not see it (twins, the night an incremental one compares with)
        with lock.acquire(RunFolder(config.output_dir).lock_file("nights"), wait=True):
            saved, planned = folder.open_plan(fresh)
    else:
        saved, planned = folder.open_plan(fresh)  # one process plans, however many start at once
    if saved.facts.get("incremental", False) != config.incremental and not planned:
        _logger.warning("keeping the saved plan (%s): --incremental applies when a night is planned",
                        "incremental" if saved.facts.get("incremental") else "every file")
    if planned:
        _logger.info("planned %d images in %d shards in %.1f s (%d other files ignored, %d folders not listed), run "
                     "id %s", len(saved.paths), saved.shard_count, time.monotonic() - started,
                     saved.facts["ignored_files"], sum(saved.facts["unlisted_folders"].values()), saved.run_id)
        return saved
    check_resume(saved.facts, identity, str(folder.path))
    if config.shard_size not in (None, saved.shard_size):
        _logger.warning("keeping the saved plan's shard size %d (asked for %d)", saved.shard_size, config.shard_size)
    return saved


def _run_facts(the_plan: Plan, prepared, config: Config) -> dict:
    """What every shard's metadata and the manifest say about the run."""
    import PIL
    import pyarrow as pa
    import torch
    import torchvision

    return {
        **the_plan.facts,
        **prepared.model.facts(),
        "partition": dict(config.partition),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pillow": PIL.__version__, "pyarrow": pa.__version__},
    }


def _summary(folder: RunFolder, the_plan: Plan, records: dict[int, dict], total: int, started: float,
             images_this_run: int, config: Config) -> Summary:
    ok = sum(record["status_counts"].get("ok", 0) for record in records.values())
    errors = sum(record["status_counts"].get("error", 0) for record in records.values())
    causes: Counter[str] = Counter()
    for record in records.values():
        causes.update(record.get("error_counts", {}))
    first = failures.first_failures(folder.path) if errors else []
    return Summary(total, ok, errors, time.monotonic() - started, images_this_run,
                   error_counts=dict(sorted(causes.items())), first_failures=first,
                   max_error_rate=config.max_error_rate,
                   unlisted_folders=the_plan.facts.get("unlisted_folders", {}),
                   unlisted_folder_paths=the_plan.facts.get("unlisted_folder_paths", []),
                   deleted=sum(record["status_counts"].get("deleted", 0) for record in records.values()))


def _finish(folder: RunFolder, the_plan: Plan, rank: ranks.Rank) -> None:
    """Publish _SUCCESS when every shard is committed, whichever process committed them."""
    ended = finish.finish(folder, the_plan)
    if not ended.finished and rank.world_size == 1:
        raise RuntimeError(f"every shard was committed but {ended.line(the_plan)}: run the same command again")
    _logger.info("%s", ended.line(the_plan))


def _run(config: Config, source, folder: RunFolder, rank: ranks.Rank, prepared, stopping,
         started: float) -> Summary:
    import torch

    from pipeline import decode, guard, infer, testhooks
    from pipeline.gpu_decode import GpuDecoder
    from pipeline.progress import Progress, Waiting
    from pipeline.writer import ShardWriter

    the_plan = _open_plan(config, source, folder, prepared.identity)
    shards = rank.shards(the_plan.shard_count)  # all of them for a single process
    folder.remove_temp_files(the_plan, shards, whole_folder=rank.world_size == 1)  # a dead run's: we hold the lock
    records = folder.repair(the_plan, shards)
    pending = [shard for shard in shards if shard not in records]
    rows = sum(len(the_plan.shard_range(shard)) for shard in shards)
    if not pending:
        _logger.info("nothing to do: all %d shards are committed", len(shards))
        _finish(folder, the_plan, rank)
        return _summary(folder, the_plan, records, rows, started, 0, config)

    device = infer.pick_device(prepared.device, rank.local_rank)
    transforms = prepared.model.transforms
    preprocess = decode.Preprocess.from_transforms(transforms)
    gpu = device.type == "cuda"
    decoder = GpuDecoder(device, preprocess, config.batch_size, prepared.dtype) if gpu else None
    classifier = infer.Classifier(prepared.model.net, device, transforms.mean, transforms.std, config.topk,
                                  prepared.dtype, decoder, classes=prepared.model.classes)
    indices = [index for shard in pending for index in the_plan.shard_range(shard)]
    dataset = testhooks.crashing(decode.ImageFiles(source, the_plan, indices, preprocess, gpu_jpeg=prepared.gpu_jpeg,
                                                   batch_size=config.batch_size,
                                                   max_pixels=config.max_image_pixels,
                                                   max_bytes=config.max_file_bytes, draft=config.jpeg_draft))
    batches = stopping.batches(guard.batches(dataset, config.batch_size, config.workers, pin_memory=gpu,
                                             decode_timeout=config.decode_timeout))  # the workers start now; a
    #   worker's death, or a file over the time limit, costs that file a row, not the run; a stop signal ends the
    #   batches, and the workers with them
    classifier.start_warm_up()  # nvJPEG's and the model's first calls, about 1.4 s, go by while the workers read
    #   the first batch. Only once the workers have forked: started before, a job hung on an H100, likely a
    #   worker forked while a thread held a lock (CUDA libraries load lazily on first calls)
    _logger.info("classifying %d images (%d shards) on %s with %d workers, %d already committed",
                 len(indices), len(pending), device, config.workers, rows - len(indices))

    metadata = {**_run_facts(the_plan, prepared, config), "config": config.to_json(), "rank": dataclasses.asdict(rank)}
    writer = ShardWriter(folder, the_plan, prepared.model.names, metadata, config.logits)
    progress = Progress(rows, rows - len(indices), config.progress, config.log_every_s)
    reading = Waiting()
    try:
        for scored in classifier.score(reading.wrap(batches)):
            writer.add(scored)
            progress.update(len(scored.batch.errors), sum(e not in (None, DELETED) for e in scored.batch.errors))
    except torch.cuda.OutOfMemoryError as error:
        raise Refused(f"out of GPU memory with {config.model} at --batch-size {config.batch_size}: run the same "
                      f"command with --batch-size {max(1, config.batch_size // 2)} (the committed shards are kept; "
                      "the batch size may change on resume)") from error
    finally:
        writer.close()
        progress.close()
    records.update(writer.committed)
    stopping.check(len(records), len(shards))
    _finish(folder, the_plan, rank)
    summary = _summary(folder, the_plan, records, rows, started, progress.images_this_run, config)
    summary.steady_seconds = time.monotonic() - (classifier.first_launch or started)
    _logger.info("waited %.1f s of %.1f s for decoded batches from the workers", reading.seconds,
                 summary.steady_seconds)
    if gpu:
        summary.gpu_peak_gib = torch.cuda.max_memory_reserved(device) / 2**30
    return summary
