"""Durable publication under failure: an I/O error names the file and its cause, leaves nothing, is never retried;
a full disk or a failed fsync ends a real run with exit 74 and the run resumes."""

import errno
import os
import re
import subprocess

import pyarrow.dataset as ds
import pytest

from pipeline import durable, testhooks
from pipeline.durable import WriteError, durable_publish, published_name, temp_name
from pipeline.verify import Check, verify_output
from tests.conftest import make_corpus, run_pipeline


def test_temp_names_map_back_to_the_published_name(tmp_path):
    temp = temp_name(tmp_path / "part-00001-abc.parquet")
    assert temp.name.startswith(".part-00001-abc.parquet.") and temp.name.endswith(".tmp")
    assert published_name(temp.name) == "part-00001-abc.parquet"
    assert published_name("part-00001-abc.parquet") is None and published_name(".hidden") is None


def test_temp_names_differ_between_hosts_as_well_as_processes(tmp_path, monkeypatch):
    mine = temp_name(tmp_path / "_plan.arrow")
    monkeypatch.setattr(durable, "_HOST", "node-0042")  # another host, where the same pid can run
    theirs = temp_name(tmp_path / "_plan.arrow")

    assert mine != theirs and theirs.name == f"._plan.arrow.node-0042.{os.getpid()}.tmp"
    assert published_name(mine.name) == published_name(theirs.name) == "_plan.arrow"
    assert published_name("._shards.part-1.parquet.json.a-b.12.tmp") == "_shards.part-1.parquet.json"


@pytest.mark.parametrize("step", ["write", "fsync", "rename"])
def test_a_failed_write_or_fsync_names_the_path_and_leaves_nothing(tmp_path, monkeypatch, step):
    monkeypatch.setattr(testhooks, "_FAIL_POINT", f"shard-{step}")
    monkeypatch.setattr(testhooks, "_FAIL_AT", "1")
    monkeypatch.setattr(testhooks, "_reached", testhooks.Counter())
    target = tmp_path / "part-00000-run.parquet"

    with pytest.raises(WriteError) as raised:
        durable_publish(target, b"x" * 1000)

    assert str(target) in str(raised.value) and "Input/output error" in str(raised.value)
    assert raised.value.__cause__.errno == errno.EIO
    assert list(tmp_path.iterdir()) == [], "no temp file and no published file"
    assert testhooks._reached[f"shard-{step}"] == 1, "the failed step is not retried"


def test_a_pause_can_be_aimed_at_one_occurrence_of_a_point(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(testhooks, "_PAUSE", {"shard-rename": 2, "record-write": 0})
    monkeypatch.setattr(testhooks, "_PAUSE_S", 0.0)
    monkeypatch.setattr(testhooks, "_reached", testhooks.Counter())

    (tmp_path / "_shards").mkdir()
    for shard in range(3):
        durable_publish(tmp_path / f"part-0000{shard}-run.parquet", b"x")
        durable_publish(tmp_path / "_shards" / f"part-0000{shard}-run.parquet.json", b"{}")

    paused = [record.getMessage() for record in caplog.records if "test pause" in record.getMessage()]
    assert [line.split(" (")[0] for line in paused] == ["test pause at record-write", "test pause at shard-rename",
                                                       "test pause at record-write", "test pause at record-write"]
    assert "(part-00001-run.parquet)" in paused[1]


def test_a_failure_after_publication_leaves_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(testhooks, "_FAIL_POINT", "manifest-dir-fsync")
    monkeypatch.setattr(testhooks, "_FAIL_AT", "")
    monkeypatch.setattr(testhooks, "_reached", testhooks.Counter())

    with pytest.raises(WriteError, match="_SUCCESS"):
        durable_publish(tmp_path / "_SUCCESS", b"{}")

    assert [p.name for p in tmp_path.iterdir()] == ["_SUCCESS"] and (tmp_path / "_SUCCESS").read_bytes() == b"{}"


def test_disk_full_is_a_write_error(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.durable.os.fsync", full)
    with pytest.raises(WriteError, match="No space left on device"):
        durable_publish(tmp_path / "part-00000-run.parquet", b"data")
    assert list(tmp_path.iterdir()) == []


def visible_rows(out):
    return sorted(ds.dataset(str(out)).to_table().column("path").to_pylist())


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: room for the plan and a few shards of the run below, not all."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); test_disk_full_is_a_write_error covers it")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.slow
def test_a_full_disk_fails_loudly_leaves_nothing_partial_and_resumes(tmp_path, small_disk):
    images = make_corpus(tmp_path / "in", 16, size=(40, 32))
    out = small_disk / "out"
    args = ["classify", str(tmp_path / "in"), str(out), "--weights", "random", "--shard-size", "4", "--batch-size",
            "4", "--workers", "1", "--progress", "log"]

    full = run_pipeline(*args, check=False)

    assert full.returncode == 74, full.stderr
    assert re.search(rf"cannot write {out}/\S+: No space left on device \(errno 28\)", full.stderr), full.stderr
    assert "run the same command to resume" in full.stderr
    assert 0 < len(list(out.glob("*.parquet"))) < 4 and not (out / "_SUCCESS").exists()
    assert not list(out.rglob(".*.tmp")), "no temporary file is left behind"
    assert verify_output(out).exit_code == Check.UNFINISHED  # every visible shard whole

    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    run_pipeline(*args)

    assert visible_rows(out) == images and verify_output(out).exit_code == Check.OK


@pytest.mark.slow
def test_an_fsync_error_is_fatal_and_never_retried(tmp_path):
    make_corpus(tmp_path / "in", 12, size=(40, 32))
    out = tmp_path / "out"

    failed = run_pipeline("classify", str(tmp_path / "in"), str(out), "--weights", "random", "--shard-size", "4",
                          "--batch-size", "4", "--workers", "1", env={"PIPELINE_TEST_FAIL": "shard-fsync@2"},
                          check=False)

    assert failed.returncode == 74, failed.stderr
    assert f"cannot write {out}/part-00001-" in failed.stderr and "Input/output error (errno 5)" in failed.stderr
    assert failed.stderr.count("test failure at shard-fsync") == 1
    assert [p.name[:10] for p in out.glob("*.parquet")] == ["part-00000"]
    assert not list(out.rglob(".*.tmp")) and verify_output(out).exit_code == Check.UNFINISHED
