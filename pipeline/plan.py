"""Cut the sorted listing into shards: the plan that a run and its resumes share, and its bytes on disk."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from pipeline.source import Listing

_FACTS_KEY = b"pipeline.plan"


@dataclass
class Plan:
    paths: pa.StringArray  # every work item in order; an Arrow array so forked workers share it
    shard_size: int
    facts: dict = field(default_factory=dict)  # the run's identity (pipeline.prepare), run id, created, counts
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

    def to_bytes(self) -> bytes:
        """The plan as an Arrow IPC file, its facts in the schema's metadata."""
        columns = {"path": self.paths} if self.escaped is None else {"path": self.paths, "escaped": self.escaped}
        table = pa.table(columns).replace_schema_metadata({_FACTS_KEY: json.dumps(self.facts)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()


def input_fingerprint(paths: list[str]) -> str:
    """sha256 over the plan's paths in order, each UTF-8 encoded and followed by a NUL byte."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def new_plan(listing: Listing, shard_size: int, identity: dict) -> Plan:
    """A fresh plan with a new run id; identity holds what a resume must match (pipeline.prepare)."""
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


def read_facts(path: Path) -> dict:
    """A saved plan's facts without reading its paths."""
    with pa.memory_map(str(path)) as source:
        return json.loads(pa.ipc.open_file(source).schema.metadata[_FACTS_KEY])


def read_plan(path: Path) -> Plan:
    """A saved plan."""
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    facts = json.loads(table.schema.metadata[_FACTS_KEY])
    paths = table.column("path").combine_chunks()
    escaped = table.column("escaped").combine_chunks() if "escaped" in table.column_names else None
    return Plan(paths=paths, shard_size=facts["shard_size"], facts=facts, escaped=escaped)
