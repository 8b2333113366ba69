"""Commit shards durably, tell from the output folder which are committed, and write the _SUCCESS manifest."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.causes import error_counts
from pipeline.durable import durable_publish
from pipeline.plan import Plan

_logger = logging.getLogger(__name__)

RECORDS_DIR = "_shards"  # one JSON record per committed shard; '_' keeps warehouse readers out
MANIFEST_NAME = "_SUCCESS"


def shard_name(plan: Plan, shard: int) -> str:
    """Unique per run (Snowflake-style reloads stay deduplicated) and stable across resumes."""
    return f"part-{shard:05d}-{plan.run_id}.parquet"


def file_names(plan: Plan, shard: int) -> tuple[str, str]:
    """The names a shard is published under: its Parquet file and its record."""
    return shard_name(plan, shard), f"{shard_name(plan, shard)}.json"


def _record_path(output_dir: Path, plan: Plan, shard: int) -> Path:
    return output_dir / RECORDS_DIR / file_names(plan, shard)[1]


def _record(plan: Plan, shard: int, data: bytes, status_counts: dict[str, int],
            error_counts: dict[str, int] | None) -> dict:
    return {
        "file": shard_name(plan, shard),
        "shard": shard,
        "rows": len(plan.shard_range(shard)),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "status_counts": status_counts,
        "error_counts": error_counts or {},  # error rows by cause (pipeline/causes.py)
    }


def commit_shard(output_dir: Path, plan: Plan, shard: int, data: bytes, status_counts: dict[str, int],
                 error_counts: dict[str, int] | None = None) -> dict:
    """Publish a shard (temp, fsync, rename, fsync folder), then its record; return the record."""
    durable_publish(output_dir / shard_name(plan, shard), data)
    record = _record(plan, shard, data, status_counts, error_counts)
    (output_dir / RECORDS_DIR).mkdir(exist_ok=True)
    durable_publish(_record_path(output_dir, plan, shard), json.dumps(record).encode())
    return record


def status_counts(statuses: pa.ChunkedArray) -> dict[str, int]:
    """How many rows have each status."""
    return {value.as_py(): count.as_py() for value, count in zip(*pc.value_counts(statuses).flatten(), strict=True)}


def _recover_record(output_dir: Path, plan: Plan, shard: int) -> dict | None:
    """The record of a visible shard whose record was not yet written (a kill between the two)."""
    path = output_dir / shard_name(plan, shard)
    try:
        data = path.read_bytes()
        table = pq.read_table(pa.BufferReader(data), columns=["status", "error"])
    except Exception as error:
        _logger.warning("shard %s is unreadable (%s): it will be redone", path.name, error)
        return None
    if table.num_rows != len(plan.shard_range(shard)):
        _logger.warning("shard %s has %d rows, not %d: it will be redone", path.name, table.num_rows,
                        len(plan.shard_range(shard)))
        return None
    record = _record(plan, shard, data, status_counts(table["status"]), error_counts(table["error"]))
    (output_dir / RECORDS_DIR).mkdir(exist_ok=True)
    durable_publish(_record_path(output_dir, plan, shard), json.dumps(record).encode())
    return record


def _read_record(path: Path) -> dict | None:
    """A shard's record, or None when it is missing or unreadable (then it is rebuilt from the shard)."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _logger.warning("record %s is unreadable (%s): rebuilding it from its shard", path.name, error)
        return None


def _looks_whole(path: Path, record: dict, rows: int) -> bool:
    """A cheap check of a committed shard: its size and its Parquet footer's row count (`verify` hashes it all)."""
    try:
        if path.stat().st_size != record["bytes"]:
            return False
        return record["rows"] == rows and pq.read_metadata(path).num_rows == rows
    except FileNotFoundError:
        return False
    except Exception as error:  # a zeroed or overwritten footer
        _logger.warning("shard %s has an unreadable footer (%s)", path.name, error)
        return False


def committed_records(output_dir: Path, plan: Plan, shards: list[int]) -> dict[int, dict]:
    """The records of those shards that are committed and whole; damaged ones are removed, to be redone."""
    records = {}
    for shard in shards:
        shard_path = output_dir / shard_name(plan, shard)
        record_path = _record_path(output_dir, plan, shard)
        record = _read_record(record_path)
        if record is None and shard_path.exists():
            record = _recover_record(output_dir, plan, shard)
        if record is not None and _looks_whole(shard_path, record, len(plan.shard_range(shard))):
            records[shard] = record
            continue
        if shard_path.exists() or record_path.exists():
            _logger.warning("shard %s is damaged or incomplete: it will be redone", shard_path.name)
        record_path.unlink(missing_ok=True)
        shard_path.unlink(missing_ok=True)
    return records


def manifest_is_readable(output_dir: Path) -> bool:
    """Whether a _SUCCESS manifest exists and parses (a damaged one is rewritten)."""
    try:
        return "shards" in json.loads((output_dir / MANIFEST_NAME).read_bytes())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as error:
        _logger.warning("the manifest %s is unreadable (%s): rewriting it", MANIFEST_NAME, error)
        return False


def write_manifest(output_dir: Path, plan: Plan, records: dict[int, dict], run_facts: dict,
                   exclusive: bool = False) -> dict | None:
    """_SUCCESS, written last: every shard's file, rows, bytes and sha256, the totals, schema version,
    fingerprints of model and input, and the run's counts. Deterministic: the same records give the same bytes.
    With exclusive, an existing _SUCCESS is kept and None returned (another process published it)."""
    shards = [records[shard] for shard in range(plan.shard_count)]
    counts: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for record in shards:
        counts.update(record["status_counts"])
        causes.update(record.get("error_counts", {}))
    manifest = {
        "run": run_facts,
        "files": len(shards),
        "rows": sum(record["rows"] for record in shards),
        "bytes": sum(record["bytes"] for record in shards),
        "schema_version": run_facts.get("schema_version"),
        "model_fingerprint": run_facts.get("weights_sha256"),  # sha256 of the weights file (of the seed: random)
        "input_fingerprint": plan.facts.get("input_fingerprint"),  # sha256 of the plan's paths (plan.py)
        "status_counts": dict(sorted(counts.items())),
        "error_counts": dict(sorted(causes.items())),
        "shards": shards,
    }
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    return manifest if durable_publish(output_dir / MANIFEST_NAME, data, exclusive=exclusive) else None
