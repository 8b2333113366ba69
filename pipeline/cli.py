"""The command line: parse options, build the Config, set up logging, call the runner. No logic here."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shlex
import sys
import threading
from enum import IntEnum
from pathlib import Path

import click

from pipeline.config import (
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_SHARD_SIZE,
    Config,
    Refused,
    default_workers,
)

_logger = logging.getLogger("pipeline")


class Exit(IntEnum):
    """The process exit codes, for cron and Slurm."""

    OK = 0
    FAILED = 1  # an unexpected error: see the log
    USAGE = 2  # bad input, weights, labels or output folder: the message names the fix
    TOO_MANY_ERRORS = 3  # every row is committed, but more failed than --max-error-rate allows
    LOCKED = 73  # another run is writing this OUTPUT (EX_CANTCREAT): the message names it
    WRITE_FAILED = 74  # disk full or I/O error writing OUTPUT (EX_IOERR): nothing partial visible; fix, rerun
    INTERRUPTED = 75  # SIGTERM, SIGINT or SIGUSR1 (EX_TEMPFAIL): committed shards kept; rerun the same command
    UNFINISHED = 10  # finalize: not every shard is committed yet (the message names them): rerun their ranks


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "azure", "fsspec", "urllib3"):
        logging.getLogger(name).setLevel(logging.INFO)  # their debug lines print request headers (signed, keyed)


def _partitions(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    from pipeline.layout import LayoutError, parse_partitions

    try:
        return parse_partitions(values)
    except LayoutError as error:
        raise click.BadParameter(str(error)) from error


def run() -> None:
    """The process's entry (`python -m pipeline`, the `pipeline` script): the command, then an immediate exit.

    When a command ends, all it wrote is durable (every commit is fsynced) and its threads and decode
    workers are joined; what is left is Python's teardown of torch's modules, about 0.8 s on an H100
    (docs/benchmarks.md), which cron and Slurm would wait for. So the process ends there, with the
    command's exit code and its log flushed. An unexpected error, a message for Python to print, or a
    thread or worker process still running (a run that ended on an error may leave its workers to
    Python's exit) ends the normal way.
    """
    try:
        main()
    except SystemExit as end:
        if not (end.code is None or isinstance(end.code, int)):
            raise
        if multiprocessing.active_children() or any(
                thread.is_alive() and not thread.daemon for thread in threading.enumerate()
                if thread is not threading.main_thread()):
            raise
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a reader that went away: Python would not print either
                pass
        os._exit(end.code or 0)


@click.group()
def main() -> None:
    """Classify folders of images with a torchvision classifier into resumable Parquet shards."""


@main.command()
@click.argument("input_dir", metavar="INPUT")
@click.argument("output_dir", metavar="OUTPUT", required=False)
@click.option("--input-list", type=click.Path(path_type=Path), default=None,
              help="A file naming the items instead of INPUT (then give OUTPUT alone): a text file (one path or URL a "
                   "line) or a Parquet or CSV file with a path column. Duplicates count once; relative paths are "
                   "taken from the file's folder.")
@click.option("--fetch-threads", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Object stores: GETs each decode worker keeps in flight.")
@click.option("--model", default="resnet18", show_default=True,
              help="Any image classifier of torchvision's registry (torchvision.models.list_models()), e.g. "
                   "resnet50, efficientnet_b0, convnext_tiny, vit_b_16, swin_t.")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet' or 'DEFAULT' (the model's default weights, from torchvision's cache under "
                   "TORCH_HOME), a weights name of the model (e.g. IMAGENET1K_V2), 'random' (seeded, for smoke tests "
                   "and benchmarks) or the path of a state_dict/checkpoint file of that model.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names, one per line; required when the weights' class count differs from the model's "
                   "default weights (a fine-tuned checkpoint), which otherwise name the classes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs; auto picks cuda when a GPU is visible.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per model batch.")
@click.option("--workers", type=click.IntRange(min=0), default=default_workers(), show_default=True,
              help="DataLoader processes that read and decode images (0: decode in the main process).")
@click.option("--shard-size", type=click.IntRange(min=1), default=None,
              help=f"Rows per Parquet shard: the unit of commit and resume [default: {DEFAULT_SHARD_SIZE}; "
                   "a resume keeps the first run's].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Model precision; auto is fp16 on a GPU and fp32 on the CPU. Logits are always stored as float32.")
@click.option("--decode", type=click.Choice(["auto", "cpu"]), default="auto", show_default=True,
              help="JPEG decoding: auto decodes plain JPEGs on the GPU (nvJPEG) when running there; cpu always "
                   "uses Pillow in the workers.")
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many best classes go in topk_labels and topk_probs.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
              help="Seed of --weights random.")
@click.option("--progress", type=click.Choice(["auto", "bar", "log"]), default="auto", show_default=True,
              help="A progress bar (auto: at a terminal) or periodic log lines (auto: under cron or Slurm).")
@click.option("--partition", multiple=True, callback=_partitions, metavar="KEY=VALUE",
              help="Write the run into the Hive partition OUTPUT/KEY=VALUE/ (repeat for nested keys), "
                   "for example --partition run_date=2024-05-01.")
@click.option("--incremental", is_flag=True,
              help="With --partition: classify only the files new or changed since the newest finished partition "
                   "of OUTPUT, and give each file gone since then a 'deleted' row (docs/operations.md).")
@click.option("--fingerprint", type=click.Choice(["stat", "content"]), default="stat", show_default=True,
              help="How a changed file is told, and what each row records of it: stat (size and modification "
                   "time) or content (the sha256 of its bytes: for filesystems whose times cannot be trusted; "
                   "reads every file when listing).")
@click.option("--logits", type=click.Choice(["float32", "float16", "none"]), default="float32", show_default=True,
              help="How the logits column keeps every class's logit: float32, float16 (rounded to half "
                   "precision, stored as float32, about half the bytes) or none (null; top-k columns stay).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True,
              help="Larger images are refused from their header (an error row 'decompression bomb'); "
                   "the default is where Pillow itself refuses (2 x PIL.Image.MAX_IMAGE_PIXELS).")
@click.option("--jpeg-draft", is_flag=True,
              help="On the CPU path, decode large JPEGs at reduced scale (Pillow's draft): faster, but the pixels "
                   "are no longer exactly the weights' own transforms (docs/benchmarks.md).")
@click.option("--max-file-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_FILE_BYTES, show_default=True,
              help="Larger files are refused before a byte is read (an error row 'file too large'); with "
                   "--max-image-pixels it bounds what one file costs a decode worker in memory.")
@click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_DECODE_TIMEOUT_S,
              show_default=True, help="Seconds a decode worker may spend on one file: past it the worker is killed and "
                                      "the file is an error row 'decode timed out' (no limit with --workers 0).")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), default=DEFAULT_MAX_ERROR_RATE, show_default=True,
              help=f"Largest share of error rows that still exits 0; above it every row is still committed but "
                   f"the exit code is {Exit.TOO_MANY_ERRORS.value}.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="This process's share of the work: the shards k with k % WORLD_SIZE == RANK [default: from "
                   "SLURM_ARRAY_TASK_ID, srun's SLURM_PROCID or torchrun's RANK, else 0].")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="How many processes share OUTPUT [default: from the Slurm array, srun or torchrun, else 1].")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def classify(input_dir: str, output_dir: str | None, verbose: bool, **options) -> None:
    """Classify every image under INPUT (a folder, or a URL prefix: s3://bucket/prefix/, gs://, az://) into Parquet
    shards in OUTPUT (a local or shared POSIX folder); or, with --input-list FILE OUTPUT, every item FILE names.

    Re-running the same command resumes at the first uncommitted shard; on a finished OUTPUT it
    changes nothing and exits 0.
    """
    _setup_logging(verbose)
    from pipeline.imports import keep_pandas_out

    keep_pandas_out()  # pyarrow would import it (seconds) on its first array; nothing here needs it
    from pipeline import runner  # imports pyarrow, not torch: a busy OUTPUT is refused before torch is imported
    from pipeline.durable import WriteError
    from pipeline.lock import Locked
    from pipeline.stop import Interrupted

    if (options["input_list"] is None) == (output_dir is None):
        raise click.UsageError("give INPUT OUTPUT, or --input-list FILE OUTPUT")
    if output_dir is None:
        input_dir, output_dir = None, input_dir
    if options["incremental"] and not options["partition"]:
        raise click.UsageError("--incremental compares tonight with earlier nights: give each night its "
                               "partition, for example --partition run_date=2024-05-01")
    from pipeline.remote import is_url

    source = input_dir if input_dir is None or is_url(input_dir) else Path(input_dir)  # a URL stays text
    config = Config(input_dir=source, output_dir=Path(output_dir), **options)
    exits = {Refused: Exit.USAGE, Locked: Exit.LOCKED, WriteError: Exit.WRITE_FAILED, Interrupted: Exit.INTERRUPTED}
    try:
        summary = runner.run(config)
    except tuple(exits) as error:
        code = next(code for kind, code in exits.items() if isinstance(error, kind))
        _logger.log(logging.WARNING if code == Exit.INTERRUPTED else logging.ERROR, "%s", error)
        sys.exit(code)
    _logger.info("done: %s", summary.line())
    for line in summary.error_lines():
        _logger.warning("%s", line)
    if summary.errors:
        _logger.info("every failed file: %s -m pipeline errors %s", shlex.quote(sys.executable),
                     shlex.quote(str(config.run_dir)))
    if summary.too_many_errors:
        _logger.error("%d of %d images failed (%.1f%%), more than --max-error-rate %g allows: every row is committed, "
                      "exiting %d so that the scheduler raises an alert", summary.errors, summary.images,
                      100 * summary.errors / summary.images, config.max_error_rate, Exit.TOO_MANY_ERRORS)
        sys.exit(Exit.TOO_MANY_ERRORS)


@main.command()
@click.argument("output_dir", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line: path, cause, error.")
def errors(output_dir: Path, as_json: bool) -> None:
    """Print every failed row of OUTPUT in plan order: path, a tab, the error (cause: detail).

    With --partition, OUTPUT is the run's partition folder, e.g. OUTPUT/run_date=2024-05-01.
    """
    _setup_logging(False)
    from pipeline import failures

    try:
        failures.print_failures(output_dir, as_json)
    except Refused as error:
        _logger.error("%s", error)
        sys.exit(Exit.USAGE)


@main.command()
@click.argument("output_dir", metavar="OUTPUT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def verify(output_dir: Path, verbose: bool) -> None:
    """Check OUTPUT: every shard exists, opens, has its recorded rows and sha256, and the plan is covered exactly
    once. Works on an unfinished OUTPUT too (reports progress and damage). Exit codes: see the README.

    With --partition, OUTPUT is the run's partition folder, e.g. OUTPUT/run_date=2024-05-01.
    """
    _setup_logging(verbose)
    from pipeline.verify import verify_output

    report = verify_output(output_dir)
    for line in report.lines():
        click.echo(line)
    sys.exit(report.exit_code)


@main.command()
@click.argument("output_dir", metavar="OUTPUT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--partition", multiple=True, callback=_partitions, metavar="KEY=VALUE",
              help="The --partition of the classify run (repeat for nested keys).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def finalize(output_dir: Path, partition: tuple[tuple[str, str], ...], verbose: bool) -> None:
    """Publish OUTPUT's _SUCCESS manifest if every shard is committed (whichever processes committed them).

    Run it as a job that depends on a multi-process run (sbatch --dependency=afterok:JOBID). It only reads
    the shards, so it is safe at any time. Exit 0: finished; 10: shards are missing (named), rerun their ranks.
    """
    _setup_logging(verbose)
    from pipeline.finish import finalize

    try:
        plan, ended = finalize(output_dir, partition)
    except Refused as error:
        _logger.error("%s", error)
        sys.exit(Exit.USAGE)
    if not ended.finished:
        _logger.error("%s", ended.line(plan))
        sys.exit(Exit.UNFINISHED)
    _logger.info("%s", ended.line(plan))
