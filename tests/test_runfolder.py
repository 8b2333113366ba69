"""The run folder: commit and resume bookkeeping (visible shards are whole, damaged ones are found and redone),
the manifest, and the leftovers of killed runs (their hidden temp files are removed, nothing else is touched)."""

import hashlib
import json

import pyarrow as pa
import pytest

from pipeline.durable import durable_publish, temp_name
from pipeline.finish import manifest
from pipeline.parquet import encode_shard, rows, with_run_columns
from pipeline.plan import new_plan
from pipeline.runfolder import MANIFEST_NAME, RunFolder, shard_name
from pipeline.source import Listing
from tests.conftest import make_corpus, run_pipeline
from tests.test_parquet import NAMES, _scored


def _commit_all(out, plan):
    for shard in range(plan.shard_count):
        indices = list(plan.shard_range(shard))
        table = rows(_scored(indices, [None] * len(indices)), plan.paths, pa.array(NAMES))
        table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
        RunFolder(out).commit(plan, shard, encode_shard(table, {}), {"ok": len(indices)}, {})


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
    assert sorted(RunFolder(tmp_path).repair(plan, [0, 1, 2])) == [0, 1, 2]

    # shard 0 truncated by a crash, shard 1's record lost (killed between shard and record)
    damaged = tmp_path / shard_name(plan.run_id, 0)
    damaged.write_bytes(damaged.read_bytes()[:100])
    (tmp_path / "_shards" / f"{shard_name(plan.run_id, 1)}.json").unlink()

    records = RunFolder(tmp_path).repair(plan, [0, 1, 2])

    assert sorted(records) == [1, 2], "a truncated shard is never trusted"
    assert not damaged.exists()
    assert records[1]["rows"] == 3 and (tmp_path / "_shards" / f"{shard_name(plan.run_id, 1)}.json").exists()


def test_a_recovered_record_counts_errors_by_cause(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(3)], 0), 3, {})
    table = rows(_scored([0, 1, 2], ["empty file", None, "decoder crashed: killed by SIGSEGV"]), plan.paths,
                 pa.array(NAMES))
    table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
    (tmp_path / shard_name(plan.run_id, 0)).write_bytes(encode_shard(table, {}))  # killed before its record was written

    records = RunFolder(tmp_path).repair(plan, [0])

    assert records[0]["status_counts"] == {"error": 2, "ok": 1}
    assert records[0]["error_counts"] == {"decoder crashed": 1, "empty file": 1}


def test_a_visible_shard_with_the_wrong_row_count_is_redone(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    short = with_run_columns(rows(_scored([0], [None]), plan.paths, pa.array(NAMES)), plan.run_id,
                             plan.facts["created_at"])
    (tmp_path / shard_name(plan.run_id, 0)).write_bytes(encode_shard(short, {}))
    assert RunFolder(tmp_path).repair(plan, [0, 1]) == {}
    assert not (tmp_path / shard_name(plan.run_id, 0)).exists()


def test_manifest_lists_every_shard_with_its_checksum(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(5)], 0), 2, {})
    _commit_all(tmp_path, plan)
    records = RunFolder(tmp_path).repair(plan, list(range(plan.shard_count)))

    RunFolder(tmp_path).publish_manifest(manifest(plan, records, {"run_id": plan.run_id}), replace=True)

    published = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert published["rows"] == 5 and published["status_counts"] == {"ok": 5}
    assert published["error_counts"] == {}
    assert [s["file"] for s in published["shards"]] == [shard_name(plan.run_id, s) for s in range(3)]

    for shard in published["shards"]:
        assert hashlib.sha256((tmp_path / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]


def test_manifest_carries_totals_versions_and_fingerprints_and_is_deterministic(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(5)], 0), 2, {})
    _commit_all(tmp_path, plan)
    records = RunFolder(tmp_path).repair(plan, list(range(plan.shard_count)))
    facts = {**plan.facts, "schema_version": 2, "weights_sha256": "ab" * 32}

    folder = RunFolder(tmp_path)

    folder.publish_manifest(manifest(plan, records, facts), replace=True)
    first = (tmp_path / MANIFEST_NAME).read_bytes()
    folder.publish_manifest(manifest(plan, dict(reversed(list(records.items()))), facts), replace=True)  # as
    #   another rank would

    assert (tmp_path / MANIFEST_NAME).read_bytes() == first
    published = json.loads(first)
    files = sorted(tmp_path.glob("part-*.parquet"))
    assert published["files"] == len(files) == 3
    assert published["bytes"] == sum(f.stat().st_size for f in files)
    assert published["schema_version"] == 2 and published["model_fingerprint"] == "ab" * 32
    assert published["input_fingerprint"] == hashlib.sha256(b"".join(f"{i}.png".encode() + b"\0" for i in range(5))
                                                           ).hexdigest()


def test_a_shard_of_the_right_size_with_a_zeroed_footer_is_redone(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    _commit_all(tmp_path, plan)
    damaged = tmp_path / shard_name(plan.run_id, 1)
    data = bytearray(damaged.read_bytes())
    data[-64:] = bytes(64)  # a crash that left the size but zeroed the last block
    damaged.write_bytes(bytes(data))

    records = RunFolder(tmp_path).repair(plan, [0, 1])

    assert sorted(records) == [0] and not damaged.exists()
    assert not (tmp_path / "_shards" / f"{shard_name(plan.run_id, 1)}.json").exists()


def test_an_unreadable_record_is_rebuilt_from_its_shard(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(4)], 0), 2, {})
    _commit_all(tmp_path, plan)
    record = tmp_path / "_shards" / f"{shard_name(plan.run_id, 0)}.json"
    good = json.loads(record.read_text())
    record.write_bytes(b"\0" * 40)

    records = RunFolder(tmp_path).repair(plan, [0, 1])

    assert sorted(records) == [0, 1] and records[0] == good and json.loads(record.read_text()) == good


def test_an_unreadable_manifest_is_not_trusted(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.read_manifest() is None
    (tmp_path / MANIFEST_NAME).write_text('{"rows": 3, "shar')
    with pytest.raises((OSError, ValueError)):
        folder.read_manifest()
    (tmp_path / MANIFEST_NAME).write_text('{"rows": 0, "shards": []}')
    assert folder.read_manifest() == {"rows": 0, "shards": []}


def test_temp_files_are_removed_and_published_files_kept(tmp_path):
    """Only this job's temp files in the run folder and its _shards/ are removed. The temp file in a partition
    folder below is kept: the old behaviour walked every folder below OUTPUT and deleted files that were not this
    job's own (another run's, in its own partition folder)."""
    plan = new_plan(Listing([f"{i}.png" for i in range(3)], 0), 1, {})
    part = [shard_name(plan.run_id, shard) for shard in range(3)]
    kept = [tmp_path / part[0], tmp_path / "_plan.arrow", tmp_path / "_shards" / "x.json",
            tmp_path / ".hidden-by-someone-else", tmp_path / "notes.tmp",
            temp_name(tmp_path / "date=2024-01-01" / part[2])]
    temps = [temp_name(tmp_path / part[1]), temp_name(tmp_path / "_SUCCESS"),
             temp_name(tmp_path / "_shards" / f"{part[1]}.json")]
    for path in kept + temps:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    assert RunFolder(tmp_path).remove_temp_files(plan, range(plan.shard_count), whole_folder=True) == 3

    assert all(path.exists() for path in kept) and not any(path.exists() for path in temps)


def test_only_the_named_files_temps_are_removed_when_names_are_given(tmp_path):
    plan = new_plan(Listing([f"{i}.png" for i in range(3)], 0), 1, {})
    mine = temp_name(tmp_path / shard_name(plan.run_id, 1))
    theirs = temp_name(tmp_path / shard_name(plan.run_id, 2))
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")

    assert RunFolder(tmp_path).remove_temp_files(plan, [1], whole_folder=False) == 1

    assert not mine.exists() and theirs.exists()


@pytest.mark.slow
def test_a_run_removes_only_the_temp_files_of_its_own_publications(tmp_path):
    """The clean-up used to walk the whole OUTPUT tree and remove anything named like `.X.HOST.PID.tmp`: a user's
    `.notes.backup.123.tmp` (INPUT == OUTPUT), and the temp files of another run writing a nested output."""
    folder = tmp_path / "shared"
    make_corpus(folder, 4)
    args = ["--weights", "random", "--device", "cpu", "--workers", "0", "--shard-size", "2"]
    failed = run_pipeline("classify", str(folder), str(folder), *args, env={"PIPELINE_TEST_FAIL": "shard-fsync@2"},
                          check=False)
    assert failed.returncode == 74, failed.stderr
    run_id = next(folder.glob("part-*.parquet")).name.split("-")[2].split(".")[0]
    users = [folder / ".notes.backup.123.tmp", folder / "d0" / ".part-00000-abcdefabcdef.parquet.host.7.tmp",
             folder / "nested" / f".part-00001-{run_id}.parquet.otherhost.8.tmp"]
    ours = [folder / f".part-00001-{run_id}.parquet.deadhost.9.tmp",
            folder / "_shards" / f".part-00001-{run_id}.parquet.json.deadhost.9.tmp"]
    for path in users + ours:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half written")

    run_pipeline("classify", str(folder), str(folder), *args)

    assert all(path.exists() for path in users)
    assert not any(path.exists() for path in ours)
