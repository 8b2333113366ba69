"""Finish a run that many processes share: once every shard is committed, publish _SUCCESS exactly once.

Whichever process finds every shard committed publishes the manifest: each rank after its own last commit, and
`pipeline finalize OUTPUT` (a dependent job). The check only reads (a shard another rank is committing is never
touched); the manifest is computed from what is on disk alone (the plan, the records, the run facts in a shard's
metadata), so every process computes the same bytes; it is published by an exclusive link, so exactly one process
publishes it and the others see that it exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.commit import MANIFEST_NAME, RECORDS_DIR, file_names, manifest_is_readable, shard_name, write_manifest
from pipeline.plan import PLAN_NAME, Plan, load_plan

_logger = logging.getLogger(__name__)

PER_PROCESS_FACTS = ("config", "rank")  # in a shard's pipeline.run metadata but not the run's: not in the manifest


class NotStarted(Exception):
    """The folder has no plan: no classify run was started there; the message names the fix."""


@dataclass
class Finish:
    published: bool  # this process published _SUCCESS
    finished: bool  # _SUCCESS exists (published by this process or another)
    missing: list[int]  # shards not (yet) committed; empty when finished

    def line(self, plan: Plan) -> str:
        if self.published:
            return f"every shard of {plan.shard_count} is committed: published {MANIFEST_NAME}"
        if self.finished:
            return f"every shard is committed; {MANIFEST_NAME} was published by another process"
        shown = ", ".join(map(str, self.missing[:20])) + (", ..." if len(self.missing) > 20 else "")
        return (f"{len(self.missing)} of {plan.shard_count} shards are not committed yet (shards {shown}); the process "
                f"that commits the last one, or `pipeline finalize`, publishes {MANIFEST_NAME}")


def _record(run_dir: Path, plan: Plan, shard: int) -> dict | None:
    """A shard's record when the shard and its record are both there and agree on the size; else None."""
    name, record_name = file_names(plan, shard)
    try:
        record = json.loads((run_dir / RECORDS_DIR / record_name).read_bytes())
        size = (run_dir / name).stat().st_size
    except (OSError, ValueError):
        return None
    return record if record.get("bytes") == size and record.get("shard") == shard else None


def committed(run_dir: Path, plan: Plan) -> tuple[dict[int, dict], list[int]]:
    """(records of committed shards, shards not committed): reads only, changes nothing."""
    records, missing = {}, []
    for shard in range(plan.shard_count):
        record = _record(run_dir, plan, shard)
        if record is None:
            missing.append(shard)
        else:
            records[shard] = record
    return records, missing


def run_facts(run_dir: Path, plan: Plan) -> dict:
    """The run's facts as its first shard's metadata holds them (the same in every shard, less per-process ones)."""
    metadata = pq.read_schema(run_dir / shard_name(plan, 0)).metadata
    facts = json.loads(metadata[b"pipeline.run"])
    return {key: value for key, value in facts.items() if key not in PER_PROCESS_FACTS}


def finish(run_dir: Path, plan: Plan) -> Finish:
    """Publish _SUCCESS if every shard is committed and no process has published it yet.

    Whether one exists is decided once, first: a _SUCCESS that another process publishes after that is met by
    the exclusive link (this process then publishes nothing). Only a damaged one (there but unreadable) is
    replaced, by whichever processes find it so, with the same bytes.
    """
    damaged = (run_dir / MANIFEST_NAME).exists()
    if damaged and manifest_is_readable(run_dir):
        return Finish(published=False, finished=True, missing=[])
    records, missing = committed(run_dir, plan)
    if missing:
        return Finish(published=False, finished=False, missing=missing)
    manifest = write_manifest(run_dir, plan, records, run_facts(run_dir, plan), exclusive=not damaged)
    return Finish(published=manifest is not None, finished=True, missing=[])


def finalize(output_dir: Path, partition: tuple[tuple[str, str], ...] = ()) -> tuple[Plan, Finish]:
    """`pipeline finalize`: finish the run in OUTPUT (or its partition folder), safe while ranks still run."""
    run_dir = output_dir.joinpath(*(f"{key}={value}" for key, value in partition))
    plan = load_plan(run_dir)
    if plan is None:
        raise NotStarted(f"{run_dir} has no {PLAN_NAME}: no classify run was started there; pass the OUTPUT (and "
                         "the --partition) that the classify run was given")
    return plan, finish(run_dir, plan)
