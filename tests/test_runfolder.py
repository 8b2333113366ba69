"""Commit and resume bookkeeping: visible shards are whole, damaged ones are found and redone."""

import hashlib
import json

import pyarrow as pa

from pipeline.commit import (
    MANIFEST_NAME,
    commit_shard,
    committed_records,
    manifest_is_readable,
    shard_name,
    write_manifest,
)
from pipeline.durable import durable_publish
from pipeline.plan import Listing, new_plan
from pipeline.writer import encode_shard, rows, with_run_columns
from tests.test_writer import NAMES, _scored


def _commit_all(out, plan):
    for shard in range(plan.shard_count):
        indices = list(plan.shard_range(shard))
        table = rows(_scored(indices, [None] * len(indices)), plan.paths, pa.array(NAMES))
        table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
        commit_shard(out, plan, shard, encode_shard(table, {}), {"ok": len(indices)})


def test_durable_publish_is_all_or_nothing_and_exclusive_on_request(tmp_path):
    target = tmp_path / "x.json"
    assert durable_publish(target, b"one")
    assert durable_publish(target, b"two")
    assert target.read_bytes() == b"two"
    assert not durable_publish(target, b"three", exclusive=True)
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_committed_shards_are_found_and_damaged_ones_removed(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(8)], 0), 3, {})
    _commit_all(tmp_path, plan)
    assert sorted(committed_records(tmp_path, plan, [0, 1, 2])) == [0, 1, 2]

    # shard 0 truncated by a crash, shard 1's record lost (killed between shard and record)
    damaged = tmp_path / shard_name(plan, 0)
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / "_shards" / f"{shard_name(plan, 1)}.json").unlink()

    records = committed_records(tmp_path, plan, [0, 1, 2])

    assert sorted(records) == [1, 2], "a truncated shard is never trusted"
    assert not damaged.exists()
    assert records[1]["rows"] == 3 and (tmp_path / "_shards" / f"{shard_name(plan, 1)}.json").exists()


def test_a_recovered_record_counts_errors_by_cause(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(3)], 0), 3, {})
    table = rows(_scored([0, 1, 2], ["empty file", None, "decoder crashed: killed by SIGSEGV"]), plan.paths,
                 pa.array(NAMES))
    table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
    (tmp_path / shard_name(plan, 0)).write_bytes(encode_shard(table, {}))  # killed before its record was written

    records = committed_records(tmp_path, plan, [0])

    assert records[0]["status_counts"] == {"error": 2, "ok": 1}
    assert records[0]["error_counts"] == {"decoder crashed": 1, "empty file": 1}


def test_a_visible_shard_with_the_wrong_row_count_is_redone(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    short = with_run_columns(rows(_scored([0], [None]), plan.paths, pa.array(NAMES)), plan.run_id,
                             plan.facts["created_at"])
    (tmp_path / shard_name(plan, 0)).write_bytes(encode_shard(short, {}))
    assert committed_records(tmp_path, plan, [0, 1]) == {}
    assert not (tmp_path / shard_name(plan, 0)).exists()


def test_manifest_lists_every_shard_with_its_checksum(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(5)], 0), 2, {})
    _commit_all(tmp_path, plan)
    records = committed_records(tmp_path, plan, list(range(plan.shard_count)))

    write_manifest(tmp_path, plan, records, {"run_id": plan.run_id})

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["rows"] == 5 and manifest["status_counts"] == {"ok": 5}
    assert manifest["error_counts"] == {}
    assert [s["file"] for s in manifest["shards"]] == [shard_name(plan, s) for s in range(3)]

    for shard in manifest["shards"]:
        assert hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]


def test_manifest_carries_totals_versions_and_fingerprints_and_is_deterministic(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(5)], 0), 2, {})
    _commit_all(tmp_path, plan)
    records = committed_records(tmp_path, plan, list(range(plan.shard_count)))
    facts = {**plan.facts, "schema_version": 2, "weights_sha256": "ab" * 32}

    manifest = write_manifest(tmp_path, plan, records, facts)
    first = (tmp_path / MANIFEST_NAME).read_bytes()
    write_manifest(tmp_path, plan, dict(reversed(list(records.items()))), facts)  # as another rank would

    assert (tmp_path / MANIFEST_NAME).read_bytes() == first
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert manifest["files"] == len(files) == 3
    assert manifest["bytes"] == sum(f.stat().st_size for f in files)
    assert manifest["schema_version"] == 2 and manifest["model_fingerprint"] == "ab" * 32
    assert manifest["input_fingerprint"] == hashlib.sha256(b"".join(f"{i}.png".encode() + b"\0" for i in range(5))
                                                           ).hexdigest()


def test_a_shard_of_the_right_size_with_a_zeroed_footer_is_redone(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    _commit_all(tmp_path, plan)
    damaged = tmp_path / shard_name(plan, 1)
    data = bytearray(damaged.read_bytes())
    data[-64:] = bytes(64)  # a crash that left the size but zeroed the last block
    damaged.write_bytes(bytes(data))

    records = committed_records(tmp_path, plan, [0, 1])

    assert sorted(records) == [0] and not damaged.exists()
    assert not (tmp_path / "_shards" / f"{shard_name(plan, 1)}.json").exists()


def test_an_unreadable_record_is_rebuilt_from_its_shard(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    _commit_all(tmp_path, plan)
    record = tmp_path / "_shards" / f"{shard_name(plan, 0)}.json"
    good = json.loads(record.read_text())
    record.write_bytes(b"\0" * 40)

    records = committed_records(tmp_path, plan, [0, 1])

    assert sorted(records) == [0, 1] and records[0] == good and json.loads(record.read_text()) == good


def test_an_unreadable_manifest_is_not_trusted(tmp_path):
    assert not manifest_is_readable(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"rows": 3, "shar')
    assert not manifest_is_readable(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"rows": 0, "shards": []}')
    assert manifest_is_readable(tmp_path)
