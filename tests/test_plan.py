"""Listing and planning: which files are work items, in which order, cut into which shards."""

import hashlib
import os
import subprocess
import sys

import pytest

from pipeline.plan import InputError, Listing, list_images, load_facts, load_plan, new_plan, save_plan
from tests.conftest import REPO, write_image


def test_lists_every_image_recursively_sorted_and_counts_the_rest(tmp_path):
    for name in ["b/2.JPG", "a/1.jpeg", "a/z/3.PNG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.TIFF"]:
        write_image(tmp_path / name, 0)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "a" / "data.csv").write_text("x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image name is not an image
    os.symlink(tmp_path / "c.webp", tmp_path / "link.webp")

    listing = list_images(tmp_path)

    assert listing.paths == ["a/1.jpeg", "a/z/3.PNG", "b/2.JPG", "c.webp", "d.bmp", "e.gif", "f.tif", "g.TIFF",
                             "link.webp"]
    assert listing.ignored == 2


def test_missing_input_empty_input_and_file_input_are_refused_with_the_fix(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match=r"found 0 images .*1 other files ignored.*\.jpg"):
        list_images(tmp_path)
    with pytest.raises(InputError, match="is not a folder"):
        list_images(tmp_path / "readme.txt")


def test_plan_cuts_shards_and_round_trips_through_the_output_folder(tmp_path):
    for i in range(7):
        write_image(tmp_path / "in" / f"{i}.png", i)
    plan = new_plan(list_images(tmp_path / "in"), shard_size=3, identity={"input_dir": "x"})
    assert plan.shard_count == 3
    assert [list(plan.shard_range(s)) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]

    out = tmp_path / "out"
    out.mkdir()
    assert save_plan(plan, out)
    loaded = load_plan(out)
    assert loaded.paths.to_pylist() == [f"{i}.png" for i in range(7)]
    assert loaded.facts == plan.facts

    other = new_plan(list_images(tmp_path / "in"), shard_size=5, identity={"input_dir": "y"})
    assert not save_plan(other, out), "a second plan must never replace the first"
    assert load_plan(out).facts["run_id"] == plan.run_id
    assert [p.name for p in out.iterdir()] == ["_plan.arrow"], "no temporary file may be left behind"


def test_plan_facts_carry_an_input_fingerprint_and_load_without_the_paths(tmp_path):
    listing = Listing(["a/1.png", "b.jpg"], 0)
    plan = new_plan(listing, shard_size=5, identity={"input_dir": "x"})
    assert plan.facts["input_fingerprint"] == hashlib.sha256(b"a/1.png\0b.jpg\0").hexdigest()
    assert plan.facts["input_fingerprint"] != new_plan(Listing(["a/1.png", "c.jpg"], 0), 5, {}).facts[
        "input_fingerprint"]
    assert load_facts(tmp_path) is None
    save_plan(plan, tmp_path)
    assert load_facts(tmp_path) == plan.facts


def test_names_with_spaces_non_ascii_and_invalid_utf8_all_become_work_items(tmp_path):
    write_image(tmp_path / "with space.jpg", 0)
    write_image(tmp_path / "ünïcödé 写真.png", 1)
    (tmp_path / "sub dir").mkdir()
    write_image(tmp_path / "sub dir" / "ok.webp", 2)
    os.mkdir(os.fsencode(tmp_path) + b"/latin-\xe9")
    for raw in (b"caf\xe9.jpg", b"latin-\xe9/a.png"):  # Latin-1 bytes: not UTF-8
        with open(os.fsencode(tmp_path) + b"/" + raw, "wb") as f:
            f.write(b"\xff\xd8\xff")

    listing = list_images(tmp_path)

    expected = ["caf\\xe9.jpg", "latin-\\xe9/a.png", "sub dir/ok.webp", "with space.jpg", "ünïcödé 写真.png"]
    assert listing.paths == expected
    assert listing.escaped == [True, True, False, False, False]
    plan = new_plan(listing, 2, {})
    out = tmp_path.parent / "out"
    out.mkdir()
    assert save_plan(plan, out)
    loaded = load_plan(out)
    assert loaded.paths.to_pylist() == expected and loaded.escaped.to_pylist() == listing.escaped


def test_a_plan_without_escaped_names_stores_no_escaped_column(tmp_path):
    write_image(tmp_path / "in" / "a.png", 0)
    plan = new_plan(list_images(tmp_path / "in"), 2, {})
    assert plan.escaped is None
    (tmp_path / "out").mkdir()
    save_plan(plan, tmp_path / "out")
    assert load_plan(tmp_path / "out").escaped is None


def test_an_unreadable_folder_is_refused_with_the_fix(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # this machine runs tests as root, for whom chmod 000 locks nothing
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot list folder .*locked \(Permission denied\): make it readable"):
        list_images(tmp_path)


# Each racer gets past its imports, says so, and spins until the go file appears: then all of them open the output
# within a millisecond or so of each other, as the ranks of a Slurm array or torchrun do.
PLAN_RACER = """
import sys, time
from pathlib import Path
from pipeline.plan import list_images, new_plan, open_plan
input_dir, output_dir, go = map(Path, sys.argv[1:])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
plan, planned = open_plan(output_dir, lambda: new_plan(list_images(input_dir), 2, {"input_dir": str(input_dir)}))
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

    saved = load_plan(tmp_path / "out")
    assert sorted(outcomes) == [[saved.run_id, "False"]] * 5 + [[saved.run_id, "True"]]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_locks", "_plan.arrow"], "no temp file left"
