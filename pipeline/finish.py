"""Finish a run that many processes share: once every shard is committed, publish the _SUCCESS manifest, once.

Whichever process finds every shard committed publishes the manifest: each rank after its own last commit, and
`pipeline finalize OUTPUT` (a dependent job). The check only reads (a shard another rank is committing is never
touched); the manifest is computed from what is on disk alone (the plan, the records, the run facts in a shard's
metadata), so every process computes the same bytes; it is published by an exclusive link, so exactly one process
publishes it and the others see that it exists. A manifest that no longer describes the committed shards (one was
redone) is published again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Refused
from pipeline.plan import Plan
from pipeline.runfolder import MANIFEST_NAME, PLAN_NAME, RunFolder

_logger = logging.getLogger(__name__)

PER_PROCESS_FACTS = ("config", "rank")  # in a shard's pipeline.run metadata but not the run's: not in the manifest


class NotStarted(Refused):
    """The folder has no plan: no classify run was started there; the message names the fix."""


@dataclass
class Finish:
    published: bool  # this process published _SUCCESS
    finished: bool  # _SUCCESS exists and describes the committed shards
    missing: list[int]  # shards not (yet) committed; empty when finished

    def line(self, plan: Plan) -> str:
        if self.published:
            return f"every shard of {plan.shard_count} is committed: published {MANIFEST_NAME}"
        if self.finished:
            return f"every shard is committed; {MANIFEST_NAME} was published before, or by another process"
        shown = ", ".join(map(str, self.missing[:20])) + (", ..." if len(self.missing) > 20 else "")
        return (f"{len(self.missing)} of {plan.shard_count} shards are not committed yet (shards {shown}); the process "
                f"that commits the last one, or `pipeline finalize`, publishes {MANIFEST_NAME}")


def manifest(plan: Plan, records: dict[int, dict], run_facts: dict) -> bytes:
    """_SUCCESS: every shard's file, rows, bytes and sha256, the totals, schema version, fingerprints of model and
    input, and the run's counts (rows by status, error rows by cause, folders not listed by cause). Deterministic:
    the same records give the same bytes."""
    shards = [records[shard] for shard in range(plan.shard_count)]
    counts: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for record in shards:
        counts.update(record["status_counts"])
        causes.update(record.get("error_counts", {}))
    content = {
        "run": run_facts,
        "files": len(shards),
        "rows": sum(record["rows"] for record in shards),
        "bytes": sum(record["bytes"] for record in shards),
        "schema_version": run_facts.get("schema_version"),
        "model_fingerprint": run_facts.get("weights_sha256"),  # sha256 of the weights file (of the seed: random)
        "input_fingerprint": plan.facts.get("input_fingerprint"),  # sha256 of the plan's paths (plan.py)
        "status_counts": dict(sorted(counts.items())),
        "error_counts": dict(sorted(causes.items())),
        "unlisted_folders": plan.facts.get("unlisted_folders", {}),  # folders below INPUT not listed, by cause
        "shards": shards,
    }
    return json.dumps(content, indent=1, sort_keys=True).encode()


def _describes(published: dict | None, records: dict[int, dict]) -> bool:
    """Whether a published manifest lists exactly the committed shards, byte for byte."""
    if published is None:
        return False
    listed = {(s.get("shard"), s.get("file"), s.get("bytes"), s.get("sha256")) for s in published["shards"]}
    return listed == {(r["shard"], r["file"], r["bytes"], r["sha256"]) for r in records.values()}


def run_facts(folder: RunFolder, plan: Plan) -> dict:
    """The run's facts as its first shard's metadata holds them (the same in every shard, less per-process ones);
    a plan of no items (an incremental night with nothing new) has only the plan's own."""
    if plan.shard_count == 0:
        return dict(plan.facts)
    facts = folder.run_facts(plan, 0)
    return {key: value for key, value in facts.items() if key not in PER_PROCESS_FACTS}


def finish(folder: RunFolder, plan: Plan) -> Finish:
    """Publish _SUCCESS if every shard is committed and no process has published one that describes them.

    Whether one exists is decided once, first: a _SUCCESS that another process publishes after that is met by the
    exclusive link (this process then publishes nothing). A damaged or stale one (unreadable, or listing other bytes
    than the committed shards) is replaced, by whichever processes find it so, with the same bytes.
    """
    records, missing = folder.committed(plan)
    if missing:
        return Finish(published=False, finished=False, missing=missing)
    exists = folder.is_finished()
    try:
        published = folder.read_manifest()
    except (OSError, ValueError) as error:
        _logger.warning("the manifest %s is unreadable (%s): publishing it again", MANIFEST_NAME, error)
        published = None
    if _describes(published, records):
        return Finish(published=False, finished=True, missing=[])
    if published is not None:
        _logger.warning("the manifest %s lists other shard bytes than those committed: publishing it again",
                        MANIFEST_NAME)
    data = manifest(plan, records, run_facts(folder, plan))
    return Finish(published=folder.publish_manifest(data, replace=exists), finished=True, missing=[])


def finalize(output_dir: Path, partition: tuple[tuple[str, str], ...] = ()) -> tuple[Plan, Finish]:
    """`pipeline finalize`: finish the run in OUTPUT (or its partition folder), safe while ranks still run."""
    folder = RunFolder(output_dir.joinpath(*(f"{key}={value}" for key, value in partition)))
    plan = folder.load_plan()
    if plan is None:
        raise NotStarted(f"{folder.path} has no {PLAN_NAME}: no classify run was started there; pass the OUTPUT "
                         "(and the --partition) that the classify run was given")
    return plan, finish(folder, plan)
