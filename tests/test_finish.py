"""Finishing a shared run: _SUCCESS once every shard is committed, exactly once, the same bytes whoever writes it."""

import hashlib
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.finish import finish
from pipeline.parquet import encode_shard, rows, with_run_columns
from pipeline.plan import new_plan
from pipeline.runfolder import MANIFEST_NAME, RECORDS_DIR, RunFolder, shard_name
from pipeline.source import Listing
from tests.conftest import REPO, make_corpus, run_pipeline
from tests.test_parquet import NAMES, _scored

FACTS = {"schema_version": 2, "model": "torchvision.models.resnet18", "weights_sha256": "ab" * 32}


def _planned(out, images=7, shard_size=2):
    out.mkdir(exist_ok=True)
    plan = new_plan(Listing([f"{i}.png" for i in range(images)], 0), shard_size, {"input_dir": "/in"})
    assert RunFolder(out).open_plan(lambda: plan)[1]
    return plan


def _commit(out, plan, shard, rank=0):
    """Commit one shard as rank `rank` would: its metadata holds the run facts plus this process's own."""
    indices = list(plan.shard_range(shard))
    table = rows(_scored(indices, [None] * len(indices)), plan.paths, pa.array(NAMES))
    table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
    metadata = {**plan.facts, **FACTS, "config": {"rank": rank}, "rank": {"rank": rank}}
    RunFolder(out).commit(plan, shard, encode_shard(table, metadata), {"ok": len(indices)}, {})


def test_nothing_is_published_or_touched_until_every_shard_is_committed(tmp_path):
    plan = _planned(tmp_path)
    for shard in (0, 1, 3):
        _commit(tmp_path, plan, shard)
    _commit(tmp_path, plan, 2)
    (tmp_path / RECORDS_DIR / f"{shard_name(plan.run_id, 2)}.json").unlink()  # its rank was killed before the record
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    ended = finish(RunFolder(tmp_path), plan)

    assert (ended.published, ended.finished, ended.missing) == (False, False, [2])
    assert "1 of 4 shards are not committed yet (shards 2)" in ended.line(plan)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before, "a check only reads"


def test_the_manifest_is_the_same_whoever_writes_it_and_published_once(tmp_path):
    plan = _planned(tmp_path)
    for shard in range(plan.shard_count):
        _commit(tmp_path, plan, shard, rank=shard % 2)  # two ranks, each with its own per-process metadata

    first = finish(RunFolder(tmp_path), plan)
    data = (tmp_path / MANIFEST_NAME).read_bytes()
    second = finish(RunFolder(tmp_path), plan)

    assert (first.published, first.finished) == (True, True)
    assert (second.published, second.finished) == (False, True)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == data
    manifest = json.loads(data)
    assert manifest["rows"] == 7 and [s["shard"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert manifest["run"] == {**plan.facts, **FACTS}, "per-process facts (config, rank) stay out"
    (tmp_path / MANIFEST_NAME).unlink()  # computed again by another process from the same files: the same bytes
    folder = RunFolder(tmp_path)
    assert finish(folder, folder.load_plan()).published and (tmp_path / MANIFEST_NAME).read_bytes() == data


def test_a_manifest_another_process_publishes_during_the_check_is_not_published_again(tmp_path, monkeypatch):
    plan = _planned(tmp_path)
    for shard in range(plan.shard_count):
        _commit(tmp_path, plan, shard)
    others = []

    committed = RunFolder.committed

    def committed_while_another_process_finishes(folder, plan, shards=None):
        if not others:  # the other process checks and publishes while this one reads the records
            others.append(None)
            others[0] = finish(RunFolder(folder.path), plan)
        return committed(folder, plan, shards)

    monkeypatch.setattr(RunFolder, "committed", committed_while_another_process_finishes)
    mine = finish(RunFolder(tmp_path), plan)

    assert others[0].published and (mine.published, mine.finished) == (False, True)


def test_an_unreadable_manifest_is_rewritten(tmp_path):
    plan = _planned(tmp_path, images=3)
    for shard in range(plan.shard_count):
        _commit(tmp_path, plan, shard)
    (tmp_path / MANIFEST_NAME).write_bytes(b'{"rows": 3, "sh')  # a torn copy made by hand

    assert finish(RunFolder(tmp_path), plan).published
    assert json.loads((tmp_path / MANIFEST_NAME).read_bytes())["rows"] == 3


# Each racer loads the plan, says it is ready, then spins until the go file appears and waits its own few
# milliseconds more: the racers check and publish at the same instant and at every moment of one another's publication.
RACER = """
import sys, time
from pathlib import Path
from pipeline.finish import finish
from pipeline.runfolder import RunFolder
out, go, delay = RunFolder(Path(sys.argv[1])), Path(sys.argv[2]), float(sys.argv[3])
plan = out.load_plan()
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
time.sleep(delay)
print(finish(out, plan).published, flush=True)
"""


def start_racers(count, out, go):
    """count processes running RACER, each past its imports and waiting for the go file."""
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(go), str(0.004 * (i // 2))],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
              for i in range(count)]
    for racer in racers:
        assert racer.stdout.readline() == "ready\n"
    return racers


def test_ranks_finishing_at_the_same_instant_publish_the_manifest_exactly_once(tmp_path):
    plan = _planned(tmp_path / "out")
    for shard in range(plan.shard_count):
        _commit(tmp_path / "out", plan, shard)
    racers = start_racers(8, tmp_path / "out", tmp_path / "go")

    (tmp_path / "go").touch()
    outcomes = [racer.communicate(timeout=60)[0] for racer in racers]

    assert sorted(outcomes) == ["False\n"] * 7 + ["True\n"]
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_bytes())["files"] == 4
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_committed_lists_what_is_missing_without_repairing(tmp_path):
    plan = _planned(tmp_path, images=4)
    _commit(tmp_path, plan, 1)
    shard = tmp_path / shard_name(plan.run_id, 1)
    shard.write_bytes(shard.read_bytes() + b"x")  # its size no longer matches its record

    records, missing = RunFolder(tmp_path).committed(plan)

    assert records == {} and missing == [0, 1]
    assert shard.exists(), "only the shard's own rank may remove it"


@pytest.mark.slow
def test_finalize_command_names_missing_shards_then_publishes(tmp_path):
    plan = _planned(tmp_path / "out")
    _commit(tmp_path / "out", plan, 0)
    _commit(tmp_path / "out", plan, 2)

    unfinished = run_pipeline("finalize", str(tmp_path / "out"), check=False)
    for shard in (1, 3):
        _commit(tmp_path / "out", plan, shard)
    done = run_pipeline("finalize", str(tmp_path / "out"), check=False)
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_bytes()
    again = run_pipeline("finalize", str(tmp_path / "out"), check=False)
    no_plan = run_pipeline("finalize", str(tmp_path), check=False)

    assert unfinished.returncode == 10 and "2 of 4 shards are not committed yet (shards 1, 3)" in unfinished.stderr
    assert done.returncode == 0 and f"published {MANIFEST_NAME}" in done.stderr
    assert again.returncode == 0 and "was published before, or by another process" in again.stderr
    assert (tmp_path / "out" / MANIFEST_NAME).read_bytes() == manifest
    assert no_plan.returncode == 2 and "no _plan.arrow" in no_plan.stderr


@pytest.mark.slow
def test_a_shard_redone_after_damage_gets_a_manifest_that_lists_its_new_bytes(tmp_path):
    """A batch size that does not divide the shard size groups a redone shard's images into other batches, so its
    CPU logits, and its bytes, differ slightly. _SUCCESS used to keep the old sha256, and verify failed for good."""
    make_corpus(tmp_path / "in", 7)
    out = tmp_path / "out"
    args = ["--weights", "random", "--device", "cpu", "--workers", "0", "--batch-size", "3", "--shard-size", "4"]
    run_pipeline("classify", str(tmp_path / "in"), str(out), *args)
    shard = sorted(out.glob("part-*.parquet"))[1]
    shard.write_bytes(shard.read_bytes()[:500])

    run_pipeline("classify", str(tmp_path / "in"), str(out), *args)

    listed = {entry["shard"]: entry for entry in json.loads((out / "_SUCCESS").read_bytes())["shards"]}
    assert listed[1]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert run_pipeline("verify", str(out)).returncode == 0
    assert run_pipeline("finalize", str(out)).returncode == 0


@pytest.mark.slow
def test_a_stale_manifest_is_published_again_by_the_next_run_and_by_finalize(tmp_path):
    """A _SUCCESS that lists other bytes than the committed shards (left by an older version after a repair) is
    replaced when a run or `finalize` finds every shard committed, instead of being kept."""
    make_corpus(tmp_path / "in", 4)
    out = tmp_path / "out"
    args = ["--weights", "random", "--device", "cpu", "--workers", "0", "--shard-size", "2"]
    run_pipeline("classify", str(tmp_path / "in"), str(out), *args)
    good = (out / "_SUCCESS").read_bytes()
    stale = json.loads(good)
    stale["shards"][0]["sha256"] = "0" * 64
    for command in (["classify", str(tmp_path / "in"), str(out), *args], ["finalize", str(out)]):
        (out / "_SUCCESS").write_text(json.dumps(stale))
        assert run_pipeline("verify", str(out), check=False).returncode == 16
        run_pipeline(*command)
        assert (out / "_SUCCESS").read_bytes() == good
        assert run_pipeline("verify", str(out)).returncode == 0
