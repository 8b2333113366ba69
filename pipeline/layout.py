"""Where a run's files go: OUTPUT or its Hive partition folder, named so that every warehouse reader accepts it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.config import Refused
from pipeline.parquet import SCHEMA
from pipeline.plan import differing_keys
from pipeline.runfolder import DAMAGED, RunFolder

# Lower case because Athena, Hive and BigQuery fold column names; a leading letter because a leading
# '_' or '.' hides a folder from readers. Values keep to characters no reader escapes or decodes.
KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LayoutError(Refused):
    """The partition or the output folder cannot take this run; the message names the fix."""


def parse_partition(text: str) -> tuple[str, str]:
    """One `--partition key=value`, checked."""
    key, equals, value = text.partition("=")
    if not equals:
        raise LayoutError(f"--partition {text!r}: write it as key=value, for example run_date=2024-05-01")
    if not KEY.fullmatch(key):
        raise LayoutError(f"--partition {text!r}: the key must be lower-case letters, digits and '_', starting "
                          "with a letter, at most 64 characters (for example run_date)")
    if key in SCHEMA.names:
        raise LayoutError(f"--partition {text!r}: {key!r} is already a column of the output; pick another key")
    if not VALUE.fullmatch(value):
        raise LayoutError(f"--partition {text!r}: the value must be letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit, at most 128 characters (no '/', '=', spaces or '%')")
    return key, value


def parse_partitions(texts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """Every `--partition`, in order (the order of the folders), each key once."""
    pairs = tuple(parse_partition(text) for text in texts)
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise LayoutError(f"--partition keys {keys} repeat a key: give each key once")
    return pairs


def check_output(run_dir: Path) -> None:
    """Refuse, before anything is written, a run folder that cannot be created or written by this process."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(run_dir)):  # Path spells 's3://b/x' as 's3:/b/x'
        raise LayoutError(f"OUTPUT {run_dir} is a URL: OUTPUT must be a POSIX filesystem path (local, NFS, Lustre), "
                          "as a shard's durable commit needs rename and fsync; copy the finished output to the "
                          "object store afterwards")
    try:
        str(run_dir).encode("utf-8")
    except UnicodeEncodeError:
        raise LayoutError(f"OUTPUT {str(run_dir)!r} is not valid UTF-8: the run facts and the manifest name it, so "
                          "pass a path whose names are UTF-8 (rename the folder)") from None
    existing = run_dir
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == run_dir:
            raise LayoutError(f"OUTPUT {run_dir} is a file, not a folder: pass a folder (a missing one is created)")
        raise LayoutError(f"{existing} is not a folder, so OUTPUT {run_dir} cannot be created under it: pass a "
                          "path whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise LayoutError(f"cannot write in {existing}: " + ("it is on a read-only filesystem" if read_only else
                          "this user has no write permission there") + "; pass an OUTPUT this user can write")


def check_layout(output_dir: Path, partition: tuple[tuple[str, str], ...]) -> None:
    """Refuse to mix layouts in one OUTPUT: Hive readers need the same keys at the same depth everywhere."""
    if not output_dir.is_dir():
        return
    if partition and RunFolder(output_dir).has_plan():
        raise LayoutError(f"{output_dir} holds an unpartitioned run: drop --partition to resume it, or write "
                          "partitioned runs to a new OUTPUT")
    with os.scandir(output_dir) as entries:
        keys = {entry.name.split("=", 1)[0] for entry in entries
                if entry.is_dir() and "=" in entry.name and not entry.name.startswith(("_", "."))}
    if keys and not partition:
        raise LayoutError(f"{output_dir} holds partitions by {', '.join(sorted(keys))}: pass --partition "
                          f"{min(keys)}=VALUE, or write to a new OUTPUT")
    if keys and partition and keys != {partition[0][0]}:
        raise LayoutError(f"{output_dir} is partitioned by {', '.join(sorted(keys))}, not {partition[0][0]}: "
                          "use the same partition keys in the same order, or write to a new OUTPUT")


def sibling_runs(output_dir: Path, partition: tuple[tuple[str, str], ...]) -> list[Path]:
    """The other partition folders of OUTPUT that hold a run (a plan), sorted."""
    if not partition:
        return []
    own = output_dir.joinpath(*(f"{key}={value}" for key, value in partition))
    return [path for path in sorted(output_dir.glob("/".join(["*=*"] * len(partition))))
            if path != own and path.is_dir() and RunFolder(path).has_plan()]


def check_no_unfinished_twin(output_dir: Path, partition: tuple[tuple[str, str], ...], identity: dict) -> None:
    """Before a new partition is planned: refuse when a sibling partition holds an unfinished run of the same
    identity (say a run killed before midnight and retried after it with the next date), which would classify the
    same images twice."""
    for path in sibling_runs(output_dir, partition):
        folder = RunFolder(path)
        if folder.is_finished():
            continue
        try:
            facts = folder.load_facts() or {}
        except DAMAGED as error:
            raise LayoutError(f"{path} holds an unfinished run whose plan cannot be read ({type(error).__name__}: "
                              f"{error}): remove that folder if it is abandoned (a run of the same input and model "
                              "beside it would classify the same images twice)") from error
        if not differing_keys(facts, identity):
            resume = " ".join(f"--partition {part}" for part in path.relative_to(output_dir).parts)
            raise LayoutError(
                f"{path} holds an unfinished run of the same input and model (run id {facts.get('run_id')}): "
                f"resume it with {resume}, or remove that folder if it is abandoned; a new run beside it "
                "would classify the same images twice"
            )
