"""Incremental nights on real files in real processes: each night classifies only what is new or changed, records
deletions once, and the latest row per path across nights is the folder's current state (DuckDB view)."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import layout, nights
from pipeline.layout import LayoutError
from pipeline.runfolder import LISTING_NAME, MANIFEST_NAME, PLAN_NAME, RunFolder
from pipeline.source import Listing
from tests.conftest import REPO, make_corpus, run_pipeline, write_image

OPTIONS = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--shard-size", "4", "--workers", "1",
           "--progress", "log", "--incremental"]
QUERIES = REPO / "docs" / "queries"


def night(input_dir: Path, out: Path, date: str, *more: str, check: bool = True, env: dict | None = None):
    return run_pipeline("classify", str(input_dir), str(out), "--partition", f"run_date={date}", *OPTIONS, *more,
                        check=check, env=env)


def start_night(input_dir: Path, out: Path, date: str, *more: str, **popen) -> subprocess.Popen:
    """The command night() runs, in a process started and not waited for; popen: Popen's keywords (stderr, ...)."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(input_dir), str(out), "--partition",
                             f"run_date={date}", *OPTIONS, *more], env={**os.environ, "PYTHONPATH": str(REPO)}, **popen)


def rows(out: Path, date: str) -> dict[str, dict]:
    """A night's rows by path (each path once: asserted)."""
    table = pq.read_table(sorted((out / f"run_date={date}").glob("part-*.parquet")))
    found = {row["path"]: row for row in table.to_pylist()}
    assert len(found) == table.num_rows, "a path has two rows in one night"
    return found


def microseconds(moment: datetime.datetime) -> int:
    return (moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)) // datetime.timedelta(microseconds=1)


def test_the_first_night_classifies_everything_and_rows_record_each_files_fingerprint(tmp_path):
    make_corpus(tmp_path / "in", 6)

    first = night(tmp_path / "in", tmp_path / "out", "d1")

    found = rows(tmp_path / "out", "d1")
    assert sorted(found) == sorted(str(p.relative_to(tmp_path / "in")) for p in (tmp_path / "in").rglob("img*"))
    assert "no earlier finished night in this OUTPUT: classifying every file (6)" in first.stderr
    for path, row in found.items():
        status = os.stat(tmp_path / "in" / path)
        assert row["status"] == "ok" and row["file_size"] == status.st_size
        assert microseconds(row["file_mtime"]) == status.st_mtime_ns // 1000
        assert row["file_sha256"] is None


def test_the_next_night_classifies_only_added_and_changed_files_and_records_each_deletion_once(tmp_path):
    make_corpus(tmp_path / "in", 8)
    files = sorted(str(p.relative_to(tmp_path / "in")) for p in (tmp_path / "in").rglob("img*"))
    night(tmp_path / "in", tmp_path / "out", "d1")
    first = rows(tmp_path / "out", "d1")
    added, resized, touched, deleted = "d9/new.png", files[0], files[1], files[2]
    write_image(tmp_path / "in" / added, seed=99, size=(40, 30))
    write_image(tmp_path / "in" / resized, seed=50, size=(70, 50))  # other pixels, another size
    os.utime(tmp_path / "in" / touched, ns=(1_600_000_000_000_000_000,) * 2)  # same bytes, older mtime
    (tmp_path / "in" / deleted).unlink()

    second = night(tmp_path / "in", tmp_path / "out", "d2")
    third = night(tmp_path / "in", tmp_path / "out", "d3")  # nothing changed since d2

    found = rows(tmp_path / "out", "d2")
    assert sorted(found) == sorted([added, resized, touched, deleted])
    assert {path: row["status"] for path, row in found.items()} == {added: "ok", resized: "ok", touched: "ok",
                                                                     deleted: "deleted"}
    gone = found[deleted]
    assert gone["label"] is None and gone["logits"] is None and gone["error"] is None and gone["file_size"] is None
    assert found[resized]["file_size"] == os.stat(tmp_path / "in" / resized).st_size != first[resized]["file_size"]
    assert found[resized]["logits"] != first[resized]["logits"], "the changed file's new pixels were classified"
    assert microseconds(found[touched]["file_mtime"]) == 1_600_000_000_000_000
    assert "3 files new or changed, 1 deleted, 5 unchanged since the night in run_date=d1" in second.stderr
    assert "deleted=1" in second.stderr
    assert not list((tmp_path / "out" / "run_date=d3").glob("part-*.parquet")), "nothing new: no rows"
    assert "0 files new or changed, 0 deleted, 8 unchanged" in third.stderr
    assert (tmp_path / "out" / "run_date=d3" / MANIFEST_NAME).exists(), "an empty night is still a finished night"
    for date in ("d1", "d2", "d3"):
        verify = run_pipeline("verify", str(tmp_path / "out" / f"run_date={date}"), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_content_fingerprints_ignore_the_mtime_and_see_an_edit_of_the_same_size(tmp_path):
    make_corpus(tmp_path / "in", 4)
    files = sorted((tmp_path / "in").rglob("img*"))
    night(tmp_path / "in", tmp_path / "out", "d1", "--fingerprint", "content")
    touched, edited = files[0], files[1]
    os.utime(touched, ns=(1_600_000_000_000_000_000,) * 2)
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes (in the entropy-coded data or the last chunk)
    stat = os.stat(edited)
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: only the content tells

    night(tmp_path / "in", tmp_path / "out", "d2", "--fingerprint", "content")

    found = rows(tmp_path / "out", "d2")
    assert list(found) == [str(edited.relative_to(tmp_path / "in"))]
    assert found[list(found)[0]]["file_sha256"] == hashlib.sha256(edited.read_bytes()).hexdigest()


def test_a_new_model_identity_forces_a_full_night_and_says_why(tmp_path):
    make_corpus(tmp_path / "in", 5)
    night(tmp_path / "in", tmp_path / "out", "d1")

    other = night(tmp_path / "in", tmp_path / "out", "d2", "--seed", "7")  # other random weights
    back = night(tmp_path / "in", tmp_path / "out", "d3", "--seed", "7")

    assert len(rows(tmp_path / "out", "d2")) == 5
    assert "was made with another weights_sha256, so its rows are not tonight's" in other.stderr
    assert "classifying every file (5)" in other.stderr
    assert not list((tmp_path / "out" / "run_date=d3").glob("part-*")) and "0 files new or changed" in back.stderr


def test_incremental_needs_a_partition(tmp_path):
    make_corpus(tmp_path / "in", 1)
    result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), *OPTIONS, check=False)
    assert result.returncode == 2 and "--partition run_date=" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_night_beside_an_unfinished_one_or_after_a_damaged_one_is_refused(tmp_path):
    make_corpus(tmp_path / "in", 6)
    night(tmp_path / "in", tmp_path / "out", "d1")
    (tmp_path / "in" / "new.png").write_bytes((tmp_path / "in" / "d1" / "sub1" / "img0001.png").read_bytes())
    night(tmp_path / "in", tmp_path / "out", "d2")
    (tmp_path / "out" / "run_date=d2" / MANIFEST_NAME).unlink()  # as if d2 were killed before it finished

    refused = night(tmp_path / "in", tmp_path / "out", "d3", check=False)

    assert refused.returncode == 2 and "resume it with --partition run_date=d2" in refused.stderr
    assert not (tmp_path / "out" / "run_date=d3").exists()

    tonight = (("run_date", "d3"),)  # damaged files of earlier nights: refused (exit 2), naming the fix
    (tmp_path / "out" / "run_date=d2" / PLAN_NAME).write_bytes(b"damaged")
    with pytest.raises(LayoutError, match="run_date=d2 holds an unfinished run whose plan cannot be read .* remove"):
        layout.check_no_unfinished_twin(tmp_path / "out", tonight, {})
    shutil.rmtree(tmp_path / "out" / "run_date=d2")
    (tmp_path / "out" / "run_date=d1" / LISTING_NAME).write_bytes(b"damaged")
    with pytest.raises(nights.NightUnreadable, match=r"run_date=d1 cannot be read .* without --incremental"):
        nights.plan_night(Listing.of([], 0), tmp_path / "out", tonight, {}, "stat", incremental=True)


@pytest.mark.slow
def test_a_night_killed_with_sigkill_and_resumed_classifies_each_file_once(tmp_path):
    make_corpus(tmp_path / "in", 4)
    night(tmp_path / "in", tmp_path / "out", "d1")
    for i in range(24):
        write_image(tmp_path / "in" / "new" / f"n{i:02d}.jpg", seed=100 + i, size=(48, 40))
    (tmp_path / "in" / "d0" / "sub0" / "img0000.jpg").unlink()
    out = tmp_path / "out" / "run_date=d2"
    process = start_night(tmp_path / "in", tmp_path / "out", "d2", stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= len(list(out.glob("part-*.parquet"))) < 7 and not (out / MANIFEST_NAME).exists()
    (tmp_path / "in" / "late.png").write_bytes((tmp_path / "in" / "d1" / "sub1" / "img0001.png").read_bytes())

    resumed = night(tmp_path / "in", tmp_path / "out", "d2")  # the saved plan: the late file waits for d3
    later = night(tmp_path / "in", tmp_path / "out", "d3")

    found = rows(tmp_path / "out", "d2")
    assert sorted(found) == sorted([f"new/n{i:02d}.jpg" for i in range(24)] + ["d0/sub0/img0000.jpg"])
    assert found["d0/sub0/img0000.jpg"]["status"] == "deleted"
    assert "already committed" in resumed.stderr
    assert sorted(rows(tmp_path / "out", "d3")) == ["late.png"], later.stderr
    assert run_pipeline("verify", str(out), check=False).returncode == 0


@pytest.mark.slow
def test_two_ranks_share_one_incremental_night(tmp_path):
    make_corpus(tmp_path / "in", 4)
    night(tmp_path / "in", tmp_path / "out", "d1")
    for i in range(20):
        write_image(tmp_path / "in" / "new" / f"n{i:02d}.png", seed=200 + i, size=(40, 40))
    ranks = [start_night(tmp_path / "in", tmp_path / "out", "d2", "--world-size", "2", "--rank", str(rank),
                         stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    logs = [rank.communicate(timeout=300)[1] for rank in ranks]

    assert [rank.returncode for rank in ranks] == [0, 0], logs
    found = rows(tmp_path / "out", "d2")
    assert sorted(found) == [f"new/n{i:02d}.png" for i in range(20)]
    assert sum("planned 20 images" in log for log in logs) == 1, "one rank planned, the other took its plan"
    shards = sorted(p.name[:10] for p in (tmp_path / "out" / "run_date=d2").glob("part-*"))
    assert shards == [f"part-{i:05d}" for i in range(5)]
    assert run_pipeline("verify", str(tmp_path / "out" / "run_date=d2"), check=False).returncode == 0


def test_a_file_whose_error_may_pass_is_classified_again_the_next_night(tmp_path):
    make_corpus(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png at all")  # an error that stays: not retried
    crash = {"PIPELINE_TEST_CRASH_ON": "img0001.png"}  # its worker dies: 'decoder crashed', which may pass
    night(tmp_path / "in", tmp_path / "out", "d1", "--max-error-rate", "1", env=crash)
    assert rows(tmp_path / "out", "d1")["d1/sub1/img0001.png"]["error"].startswith("decoder crashed")
    listed = run_pipeline("errors", str(tmp_path / "out" / "run_date=d1")).stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["broken.png", "d1/sub1/img0001.png"]

    night(tmp_path / "in", tmp_path / "out", "d2")

    found = rows(tmp_path / "out", "d2")
    assert list(found) == ["d1/sub1/img0001.png"] and found["d1/sub1/img0001.png"]["status"] == "ok"


def test_the_files_of_a_folder_not_listed_tonight_are_neither_deleted_nor_classified(tmp_path):
    before = nights.listing_table(Listing.of([("a/1.jpg", 1, 1, None), ("b/2.jpg", 2, 2, None),
                                              ("b/3.jpg", 3, 3, None), ("c.jpg", 4, 4, None)], 0))
    tonight = Listing.of([("a/1.jpg", 1, 1, None), ("d.jpg", 5, 5, None)], 0,
                         skipped=["b"])  # b unreadable, c.jpg deleted

    result = nights._compare(tonight, nights.listing_table(tonight), before, pa.array(["b/3.jpg"]), "stat")

    assert result.work.paths == ["d.jpg"] and result.deleted == ["c.jpg"]
    state = {row["path"]: row["file_size"] for row in result.state.to_pylist()}
    assert state == {"a/1.jpg": 1, "d.jpg": 5, "b/2.jpg": 2, "b/3.jpg": None}, "b/3.jpg's error is retried later"


def test_duckdb_current_state_view_is_the_folders_files_with_their_latest_predictions(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    make_corpus(tmp_path / "in", 6)
    files = sorted(str(p.relative_to(tmp_path / "in")) for p in (tmp_path / "in").rglob("img*"))
    night(tmp_path / "in", tmp_path / "out", "2024-05-01")
    write_image(tmp_path / "in" / files[0], seed=77, size=(50, 60))
    (tmp_path / "in" / files[1]).unlink()
    write_image(tmp_path / "in" / "z" / "added.webp", seed=78, size=(30, 30))
    night(tmp_path / "in", tmp_path / "out", "2024-05-02")
    shutil.rmtree(tmp_path / "in" / "z")
    night(tmp_path / "in", tmp_path / "out", "2024-05-03")

    con = duckdb.connect()
    con.execute((QUERIES / "current_state.sql").read_text().replace("{output}", str(tmp_path / "out")))
    current = {path: (date, logits) for path, date, logits in
               con.execute("SELECT path, run_date, logits FROM current_state").fetchall()}

    now = sorted(str(p.relative_to(tmp_path / "in")) for p in (tmp_path / "in").rglob("*") if p.is_file())
    assert sorted(current) == now == sorted(files[:1] + files[2:])
    latest = {**rows(tmp_path / "out", "2024-05-01"), **rows(tmp_path / "out", "2024-05-02")}
    for path, (date, logits) in current.items():
        expected = "2024-05-02" if path == files[0] else "2024-05-01"
        assert str(date) == expected
        assert np.allclose(logits, latest[path]["logits"])
    assert RunFolder(tmp_path / "out" / "run_date=2024-05-03").load_plan().facts["deleted"] == 1


def test_rows_record_the_content_hash_without_a_partition_too(tmp_path):
    make_corpus(tmp_path / "in", 2)
    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), *OPTIONS[:-1], "--fingerprint", "content")

    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    for path, digest in zip(table["path"].to_pylist(), table["file_sha256"].to_pylist(), strict=True):
        assert digest == hashlib.sha256((tmp_path / "in" / path).read_bytes()).hexdigest()
    assert not (tmp_path / "out" / "_listing.arrow").exists(), "a listing is kept for partitioned runs only"
