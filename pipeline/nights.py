"""Plan a partitioned run, and with --incremental only what changed in INPUT since the newest finished night.

Every partitioned run publishes its whole input listing (RunFolder's _listing.arrow: each listed file and its
fingerprint) just before its plan. An incremental night lists INPUT and compares with the listing of the newest
finished night of the same OUTPUT (the partition with the newest plan among those whose _SUCCESS is published):
- a file not listed there, or whose fingerprint differs (size or mtime; the sha256 with --fingerprint content):
  classified tonight;
- a file whose row there is an error of a cause that may pass (causes.RETRIED: vanished, unreadable, timed out...):
  classified again tonight;
- a file listed there and not tonight: a `deleted` row tonight, once;
- any other file: no row tonight; its latest row is in an earlier night.
A folder that cannot be listed tonight keeps its files' earlier entries: they are neither deleted nor classified.
When that newest night was made with another identity (input, model, weights, any option that changes a row,
the fingerprint kind), the night classifies everything, so that the latest row of every path is of one identity;
the log says why. The state read is one listing and the few error rows of one night: bounded, whatever the number
of nights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

from pipeline import causes, layout
from pipeline.config import Refused
from pipeline.fingerprint import CONTENT
from pipeline.plan import differing_keys
from pipeline.runfolder import DAMAGED, RunFolder
from pipeline.source import Listing

_logger = logging.getLogger(__name__)

LISTING_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("file_size", pa.int64()),
    pa.field("file_mtime_ns", pa.int64()),  # exact, to compare; rows keep microseconds
    pa.field("file_sha256", pa.string()),
    pa.field("file_etag", pa.string()),  # objects only
])


@dataclass
class Night:
    work: Listing  # the files to classify tonight, in order, with their fingerprints
    deleted: list[str] = field(default_factory=list)  # files gone since the night compared with: a row each
    state: pa.Table | None = None  # tonight's whole listing (LISTING_SCHEMA), published for the next night
    facts: dict = field(default_factory=dict)  # for the plan: incremental, the night compared with, counts


def listing_table(listing: Listing) -> pa.Table:
    count = len(listing.paths)
    return pa.Table.from_arrays(
        [pa.array(listing.paths, pa.string()),
         *(pa.array(values if values is not None else [None] * count, field.type) for values, field in
           zip([listing.sizes, listing.mtimes_ns, listing.sha256, listing.etags], list(LISTING_SCHEMA)[1:],
               strict=True))],
        schema=LISTING_SCHEMA)


def listing_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_listing(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_file(source).read_all().combine_chunks()


class NightUnreadable(Refused):
    """The night tonight would be compared with cannot be read: comparing with an older one could miss a deletion."""


def previous_night(output_dir: Path, partition: tuple[tuple[str, str], ...]) -> tuple[RunFolder, dict] | None:
    """The finished night with the newest plan among the other partitions of OUTPUT that hold a listing, and its
    plan's facts (read once: they order the nights, and say what the night was made with)."""
    finished = [(folder, _read(folder, folder.load_facts)) for path in layout.sibling_runs(output_dir, partition)
                if (folder := RunFolder(path)).is_finished() and folder.listing_file() is not None]
    return max(finished, key=lambda night: (night[1]["created_at"], night[0].path.name), default=None)


def _read(folder: RunFolder, read):
    """read() of a finished night's files; refused, naming the fix, when they are damaged."""
    try:
        return read()
    except DAMAGED as error:
        raise NightUnreadable(
            f"the finished night in {folder.path} cannot be read ({type(error).__name__}: {error}), so tonight "
            f"cannot be compared with it: check it with `pipeline verify {folder.path}`; to go on, run tonight "
            "without --incremental (every file classified), or remove that night's folder if it is not needed"
        ) from error


def plan_night(listing: Listing, output_dir: Path, partition: tuple[tuple[str, str], ...], identity: dict,
               fingerprint: str, incremental: bool) -> Night:
    """Tonight's work: every listed file, or with incremental what changed since the previous night."""
    tonight = listing_table(listing)
    if not incremental:
        return Night(listing, state=tonight, facts={"incremental": False})
    previous = previous_night(output_dir, partition)
    reason = _why_full(previous, identity)
    if reason is not None:
        _logger.info("incremental night: %s: classifying every file (%d)", reason, len(listing.paths))
        return Night(listing, state=tonight, facts={"incremental": True, "compared_with": None})
    base, base_facts = previous
    before = _read(base, lambda: (read_listing(base.listing_file()), _retried(base)))
    night = _compare(listing, tonight, *before, fingerprint)
    night.facts = {"incremental": True, "compared_with": {"partition": base.path.name, "run_id": base_facts["run_id"]},
                   "unchanged": len(tonight) - len(night.work.paths)}
    _logger.info("incremental night: %d files new or changed, %d deleted, %d unchanged since the night in %s "
                 "(run id %s)", len(night.work.paths), len(night.deleted), night.facts["unchanged"], base.path.name,
                 base_facts["run_id"])
    return night


def _why_full(previous: tuple[RunFolder, dict] | None, identity: dict) -> str | None:
    """Why tonight cannot be compared with the previous night (previous_night: its folder and plan's facts) and
    classifies everything, or None when it can."""
    if previous is None:
        return "no earlier finished night in this OUTPUT"
    base, facts = previous
    changed = differing_keys(facts, identity)
    if changed:
        return (f"the newest finished night ({base.path.name}) was made with another {', '.join(changed)}, so its "
                "rows are not tonight's")
    return None


def _retried(base: RunFolder) -> pa.Array:
    """The paths whose row in base is an error that may pass: classified again tonight."""
    if not any(cause in causes.RETRIED for cause in base.read_manifest().get("error_counts", {})):
        return pa.array([], pa.string())  # most nights: the plan's paths are not even read
    plan = base.load_plan()
    records, _ = base.committed(plan)
    paths = []
    for shard, record in sorted(records.items()):
        if any(cause in causes.RETRIED for cause in record.get("error_counts", {})):
            paths += [path for path, error in zip(*base.failed_rows(plan, shard), strict=True)
                      if causes.cause_of(error) in causes.RETRIED]
    return pa.array(paths, pa.string())


def _compare(listing: Listing, tonight: pa.Table, before: pa.Table, retried: pa.Array, fingerprint: str) -> Night:
    """Tonight's work, deletions and state, from tonight's listing and the previous night's."""
    if listing.skipped:  # folders not listed tonight: their files stay as they were, retried ones with a null
        #   fingerprint so that the next listed night classifies them
        kept = pc.invert(pc.is_in(before["path"], value_set=tonight["path"]))
        kept = pc.and_(kept, _under_any(before["path"], listing.skipped))
        carried = before.filter(kept)
        retry = pc.is_in(carried["path"], value_set=retried)
        no_size = pa.scalar(None, pa.int64())
        carried = carried.set_column(1, "file_size", pc.if_else(retry, no_size, carried["file_size"]))
        tonight_state = pa.concat_tables([tonight, carried])
    else:
        tonight_state = tonight
    at = pc.index_in(tonight["path"], value_set=before["path"])
    previous = before.take(at)  # null rows where the file is new
    if fingerprint == CONTENT:
        same = pc.equal(tonight["file_sha256"], previous["file_sha256"])
    else:
        same = pc.and_(pc.and_(pc.equal(tonight["file_size"], previous["file_size"]),
                               pc.equal(tonight["file_mtime_ns"], previous["file_mtime_ns"])),
                       _same_or_both_null(tonight["file_etag"], previous["file_etag"]))
    work = pc.or_(pc.invert(pc.fill_null(same, False)), pc.is_in(tonight["path"], value_set=retried))
    gone = pc.invert(pc.is_in(before["path"], value_set=tonight_state["path"]))
    work_table = tonight.filter(work)
    return Night(
        work=Listing(work_table["path"].to_pylist(), listing.ignored, listing.unlisted, listing.unlisted_paths,
                     sizes=work_table["file_size"].to_pylist(), mtimes_ns=work_table["file_mtime_ns"].to_pylist(),
                     sha256=work_table["file_sha256"].to_pylist() if fingerprint == CONTENT else None,
                     skipped=listing.skipped),
        deleted=sorted(before["path"].filter(gone).to_pylist()),
        state=tonight_state,
    )


def _same_or_both_null(now: pa.ChunkedArray, before: pa.ChunkedArray) -> pa.Array:
    return pc.coalesce(pc.equal(now, before), pc.and_(pc.is_null(now), pc.is_null(before)))


def _under_any(paths: pa.ChunkedArray, folders: list[str]) -> pa.Array:
    """Whether each path lies below one of the folders."""
    below = pa.array([False] * len(paths))
    for folder in folders:
        below = pc.or_(below, pc.starts_with(paths, folder + "/"))
    return below
