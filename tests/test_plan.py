"""Planning: the listing cut into shards, the plan's facts, and its one publication in the output folder."""

import hashlib
import os
import subprocess
import sys

from pipeline.durable import durable_publish
from pipeline.plan import differing_keys, new_plan
from pipeline.runfolder import PLAN_NAME, RunFolder
from pipeline.source import Listing, LocalFolder
from tests.conftest import REPO, write_image


def test_plan_cuts_shards_and_round_trips_through_the_output_folder(tmp_path):
    for i in range(7):
        write_image(tmp_path / "in" / f"{i}.png", i)
    plan = new_plan(LocalFolder(tmp_path / "in").list(), shard_size=3, identity={"input_dir": "x"})
    assert plan.shard_count == 3
    assert [list(plan.shard_range(s)) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]

    out = tmp_path / "out"
    out.mkdir()
    folder = RunFolder(out)
    assert folder.open_plan(lambda: plan) == (plan, True)
    loaded = folder.load_plan()
    assert loaded.paths.to_pylist() == [f"{i}.png" for i in range(7)]
    assert loaded.facts == plan.facts

    other = new_plan(LocalFolder(tmp_path / "in").list(), shard_size=5, identity={"input_dir": "y"})
    kept, published = folder.open_plan(lambda: other)
    assert not published and kept.facts == plan.facts, "a second plan must never replace the first"
    assert not durable_publish(out / PLAN_NAME, other.to_bytes(), exclusive=True), \
        "a second plan must never replace the first"
    assert folder.load_plan().facts["run_id"] == plan.run_id
    assert sorted(p.name for p in out.iterdir()) == ["_locks", PLAN_NAME], "no temporary file may be left behind"


def test_the_keys_of_an_identity_that_saved_facts_do_not_hold_are_named_in_its_order():
    identity = {"input_dir": "/in", "topk": 5, "labels_sha256": None}
    assert differing_keys({**identity, "run_id": "r"}, identity) == [], "the facts' other keys do not count"
    assert differing_keys({"input_dir": "/in", "topk": 3}, identity) == ["topk", "labels_sha256"], \
        "a key not recorded differs, whatever the value"


def test_plan_facts_carry_an_input_fingerprint_and_load_without_the_paths(tmp_path):
    listing = Listing(["a/1.png", "b.jpg"], 0)
    plan = new_plan(listing, shard_size=5, identity={"input_dir": "x"})
    assert plan.facts["input_fingerprint"] == hashlib.sha256(b"a/1.png\0b.jpg\0").hexdigest()
    assert plan.facts["input_fingerprint"] != new_plan(Listing(["a/1.png", "c.jpg"], 0), 5, {}).facts[
        "input_fingerprint"]
    assert RunFolder(tmp_path).load_facts() is None
    RunFolder(tmp_path).open_plan(lambda: plan)
    assert RunFolder(tmp_path).load_facts() == plan.facts


def test_folders_that_could_not_be_listed_are_in_the_plans_facts(tmp_path):
    listing = Listing(["a.png"], 2, {"folder vanished": 1},
                      [{"path": "upload_00067", "error": "folder vanished: No such file or directory"}])
    plan = new_plan(listing, 2, {})
    RunFolder(tmp_path).open_plan(lambda: plan)
    facts = RunFolder(tmp_path).load_plan().facts
    assert facts["unlisted_folders"] == {"folder vanished": 1} and facts["ignored_files"] == 2
    assert facts["unlisted_folder_paths"] == listing.unlisted_paths


# Each racer gets past its imports, says so, and spins until the go file appears: then all of them open the output
# within a millisecond or so of each other, as the ranks of a Slurm array or torchrun do.
PLAN_RACER = """
import sys, time
from pathlib import Path
from pipeline.plan import differing_keys, new_plan
from pipeline.runfolder import RunFolder
from pipeline.source import LocalFolder
input_dir, output_dir, go = map(Path, sys.argv[1:])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
plan, planned = RunFolder(output_dir).open_plan(
    lambda: new_plan(LocalFolder(input_dir).list(), 2, {"input_dir": str(input_dir)}))
print(plan.run_id, planned, flush=True)
"""


def test_processes_opening_an_output_at_the_same_instant_get_one_plan(tmp_path):
    for i in range(20):
        write_image(tmp_path / "in" / f"{i:02d}.png", i, size=(8, 8))
    (tmp_path / "out").mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", PLAN_RACER, str(tmp_path / "in"), str(tmp_path / "out"),
                                str(tmp_path / "go")], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, text=True) for _ in range(6)]
    for racer in racers:
        assert racer.stdout.readline() == "ready\n"

    (tmp_path / "go").touch()
    outcomes = [racer.communicate(timeout=60)[0].split() for racer in racers]

    saved = RunFolder(tmp_path / "out").load_plan()
    assert sorted(outcomes) == [[saved.run_id, "False"]] * 5 + [[saved.run_id, "True"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_locks", "_plan.arrow"], "no temp file left"

