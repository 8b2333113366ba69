"""Cut the sorted listing into shards: the plan that a run and its resumes share, and its bytes on disk."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

from pipeline.parquet import FILE_FIELDS
from pipeline.source import Listing

_FACTS_KEY = b"pipeline.plan"


@dataclass
class Plan:
    paths: pa.StringArray  # every work item in order; an Arrow array so forked workers share it
    shard_size: int
    facts: dict = field(default_factory=dict)  # the run's identity (pipeline.prepare), run id, created, counts
    files: pa.Table | None = None  # each item's fingerprint (parquet.FILE_FIELDS), in plan order; nulls where
    #   none was taken

    @property
    def deleted_from(self) -> int:
        """The first plan index of the items that are deletions (an incremental night's last items): they get a
        `deleted` row and are never read."""
        return self.facts.get("deleted_from", len(self.paths))

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
        files = self.files if self.files is not None else pa.table({})
        table = pa.Table.from_arrays([self.paths, *files.columns], ["path", *files.column_names])
        table = table.replace_schema_metadata({_FACTS_KEY: json.dumps(self.facts)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()


def input_fingerprint(paths: list[str]) -> str:
    """sha256 over the plan's paths in order, each UTF-8 encoded and followed by a NUL byte."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8") + b"\0")
    return digest.hexdigest()


def fingerprints(listing: Listing, deleted: int = 0) -> pa.Table:
    """The listing's fingerprints as the rows record them (parquet.FILE_FIELDS), then nulls for `deleted` more."""
    count = len(listing.paths)

    def column(values: list | None, arrow_type: pa.DataType) -> pa.Array:
        return pa.array((values if values is not None else [None] * count) + [None] * deleted, arrow_type)

    mtimes = pc.divide(column(listing.mtimes_ns, pa.int64()), 1000)  # ns -> us, as every warehouse reads them
    return pa.Table.from_arrays([column(listing.sizes, pa.int64()), mtimes.cast(FILE_FIELDS[1].type),
                                 column(listing.sha256, pa.string())], schema=pa.schema(FILE_FIELDS))


def new_plan(listing: Listing, shard_size: int, identity: dict, deleted: list[str] | None = None) -> Plan:
    """A fresh plan with a new run id; identity holds what a resume must match (pipeline.prepare). deleted: an
    incremental night's deletions, planned after the listed items."""
    deleted = deleted or []
    paths = listing.paths + deleted
    facts = dict(identity)
    facts.update(
        run_id=uuid.uuid4().hex[:12],
        created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),  # orders nights in the warehouse
        items=len(paths),
        deleted=len(deleted),
        deleted_from=len(listing.paths),
        ignored_files=listing.ignored,
        unlisted_folders=listing.unlisted,  # folders below INPUT that could not be listed, by cause
        unlisted_folder_paths=listing.unlisted_paths,  # the first few: path and error
        shard_size=shard_size,
        input_fingerprint=input_fingerprint(paths),
    )
    return Plan(paths=pa.array(paths, type=pa.string()), shard_size=shard_size, facts=facts,
                files=fingerprints(listing, len(deleted)))


def differing_keys(saved: dict, identity: dict) -> list[str]:
    """The keys of identity, in its order, whose value saved facts do not hold: a different value, or none recorded
    (a plan made by an older version)."""
    return [key for key, value in identity.items() if key not in saved or saved[key] != value]


def read_facts(path: Path) -> dict:
    """A saved plan's facts without reading its paths."""
    with pa.memory_map(str(path)) as source:
        return json.loads(pa.ipc.open_file(source).schema.metadata[_FACTS_KEY])


def read_plan(path: Path) -> Plan:
    """A saved plan."""
    with pa.OSFile(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    facts = json.loads(table.schema.metadata[_FACTS_KEY])
    files = table.drop_columns(["path"]).combine_chunks() if table.num_columns > 1 else None
    return Plan(paths=table.column("path").combine_chunks(), shard_size=facts["shard_size"], facts=facts,
                files=files)
