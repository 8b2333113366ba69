"""List the input folder and cut the sorted image paths into shards: the plan a run and its resumes share."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from pipeline import lock
from pipeline.durable import durable_publish

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PLAN_NAME = "_plan.arrow"  # a leading '_' and no '.parquet': warehouse readers and table globs skip it


class InputError(Exception):
    """The input folder cannot be planned; the message names the fix."""


@dataclass
class Listing:
    paths: list[str]  # image paths relative to the input folder, '/'-separated, sorted
    ignored: int  # files under the folder that are not images by extension
    escaped: list[bool] | None = None  # per path: its name is not valid UTF-8, so it holds \xNN escapes


@dataclass
class Plan:
    paths: pa.StringArray  # every work item in order; an Arrow array so forked workers share it
    shard_size: int
    facts: dict = field(default_factory=dict)  # run identity: input, weights, run id, created
    escaped: pa.BooleanArray | None = None  # True where the file name is not valid UTF-8 (path holds \xNN
    #   escapes: an error row, never read); None when no name needed escaping

    @property
    def run_id(self) -> str:
        return self.facts["run_id"]

    @property
    def shard_count(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """The plan indices of one shard."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, len(self.paths)))


def check_input(input_dir: Path) -> None:
    if not input_dir.exists():
        raise InputError(f"input folder {input_dir} does not exist: pass an existing folder of images")
    if not input_dir.is_dir():
        raise InputError(f"input {input_dir} is not a folder: pass the folder that holds the images")


def _utf8(relative: str) -> tuple[str, bool]:
    """The path as valid UTF-8 text: undecodable bytes (surrogate escapes) become \\xNN; True when any did."""
    try:
        relative.encode("utf-8")
        return relative, False
    except UnicodeEncodeError:
        return os.fsencode(relative).decode("utf-8", "backslashreplace"), True


def _scandir(folder: Path):
    try:
        return os.scandir(folder)
    except OSError as error:
        raise InputError(f"cannot list folder {folder} ({error.strerror}): make it readable by this user, "
                         "or move it out of the input folder") from error


def list_images(input_dir: Path) -> Listing:
    """Every image-named regular file or symlink under input_dir, recursively, sorted."""
    check_input(input_dir)
    paths: list[tuple[str, bool]] = []
    ignored = 0
    pending = [""]
    while pending:
        relative_dir = pending.pop()
        with _scandir(input_dir / relative_dir) as entries:
            for entry in entries:
                relative = f"{relative_dir}/{entry.name}" if relative_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(relative)
                elif not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                    ignored += 1  # fifos, sockets, devices
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    paths.append(_utf8(relative))
                else:
                    ignored += 1
    paths.sort()
    if not paths:
        extensions = " ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(
            f"found 0 images under {input_dir} ({ignored} other files ignored); "
            f"image extensions are: {extensions} (any case)"
        )
    escaped = [bad for _, bad in paths]
    return Listing(paths=[path for path, _ in paths], ignored=ignored, escaped=escaped if any(escaped) else None)


def input_fingerprint(paths: list[str]) -> str:
    """sha256 over the plan's paths in order, each UTF-8 encoded and followed by a NUL byte."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def new_plan(listing: Listing, shard_size: int, identity: dict) -> Plan:
    """A fresh plan with a new run id; identity holds what a resume must match (input, weights)."""
    facts = dict(identity)
    facts.update(
        run_id=uuid.uuid4().hex[:12],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        items=len(listing.paths),
        ignored_files=listing.ignored,
        shard_size=shard_size,
        input_fingerprint=input_fingerprint(listing.paths),
    )
    escaped = pa.array(listing.escaped, type=pa.bool_()) if listing.escaped else None
    return Plan(paths=pa.array(listing.paths, type=pa.string()), shard_size=shard_size, facts=facts, escaped=escaped)


def save_plan(plan: Plan, output_dir: Path) -> bool:
    """Publish the plan once; False when another process published one first (then load that)."""
    columns = {"path": plan.paths} if plan.escaped is None else {"path": plan.paths, "escaped": plan.escaped}
    table = pa.table(columns)
    table = table.replace_schema_metadata({"pipeline.plan": json.dumps(plan.facts)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return durable_publish(output_dir / PLAN_NAME, sink.getvalue().to_pybytes(), exclusive=True)


def open_plan(output_dir: Path, make: Callable[[], Plan]) -> tuple[Plan, bool]:
    """The saved plan of output_dir, or else make()'s, published: (plan, True when this process published it).

    However many processes open the same output at once, one of them lists and plans while the others wait on
    the `plan` lock (no rank lists a million files for nothing), and exactly one plan is published (save_plan's
    exclusive link, which holds even where the lock only excludes processes of one host); all get that one.
    """
    saved = load_plan(output_dir)
    if saved is not None:
        return saved, False
    with lock.acquire(output_dir, "plan", wait=True):  # released by the kernel if the planner dies
        saved = load_plan(output_dir)
        if saved is not None:
            return saved, False
        fresh = make()
        if save_plan(fresh, output_dir):
            return fresh, True
    return load_plan(output_dir), False  # published by a process the lock did not exclude


def load_facts(output_dir: Path) -> dict | None:
    """The saved plan's facts (run id, input, weights, ...) without reading its paths; None when there is none."""
    path = output_dir / PLAN_NAME
    if not path.exists():
        return None
    with pa.memory_map(str(path)) as source:
        return json.loads(pa.ipc.open_file(source).schema.metadata[b"pipeline.plan"])


def load_plan(output_dir: Path) -> Plan | None:
    """The saved plan of output_dir, or None when there is none yet."""
    path = output_dir / PLAN_NAME
    if not path.exists():
        return None
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    facts = json.loads(table.schema.metadata[b"pipeline.plan"])
    paths = table.column("path").combine_chunks()
    escaped = table.column("escaped").combine_chunks() if "escaped" in table.column_names else None
    return Plan(paths=paths, shard_size=facts["shard_size"], facts=facts, escaped=escaped)
