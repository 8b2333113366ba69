"""One writer per output: a second run is refused naming the first; a killed holder never blocks the next run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pytest

from pipeline.lock import Locked, acquire, held
from pipeline.runfolder import RunFolder
from tests.conftest import REPO, make_corpus, run_pipeline
from tests.test_stop import group_members


def _output_lock(folder):
    return RunFolder(folder).lock_file("output")


def test_a_second_holder_is_refused_with_the_first_ones_details(tmp_path):
    with acquire(_output_lock(tmp_path)) as path:
        assert path == _output_lock(tmp_path) and path.parent.name.startswith("_")
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(Locked) as refused:
            with acquire(_output_lock(tmp_path)):
                pass
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started {holder['started']}" in message
    with acquire(_output_lock(tmp_path)):  # released on exit
        pass


def test_shared_holders_exclude_an_exclusive_one_but_not_each_other(tmp_path):
    with acquire(_output_lock(tmp_path), shared=True), acquire(_output_lock(tmp_path), shared=True):
        with pytest.raises(Locked, match="holds the lock shared"):
            with acquire(_output_lock(tmp_path)):
                pass
        with acquire(RunFolder(tmp_path).lock_file("rank-00001")):  # a rank's own lock is another file
            pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.lock import acquire\n"
                               "from pipeline.runfolder import RunFolder\n"
                               "with acquire(RunFolder(Path(sys.argv[1])).lock_file('output')):\n"
                               "    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(Locked, match=f"pid {holder.pid} "):
        with acquire(_output_lock(tmp_path)):
            pass

    holder.send_signal(signal.SIGKILL)
    holder.wait()

    with acquire(_output_lock(tmp_path)) as path:  # the kernel released the dead holder's lock
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_concurrent_run_on_the_same_output_fails_fast_and_the_first_finishes(tmp_path):
    make_corpus(tmp_path / "in", 12, size=(40, 32))
    args = ["classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random", "--shard-size", "4",
            "--workers", "1", "--progress", "log"]
    log, release = tmp_path / "first.log", tmp_path / "release"
    with open(log, "wb") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_TEST_PAUSE": "shard-rename@1",
                                      "PIPELINE_TEST_PAUSE_S": "120", "PIPELINE_TEST_RELEASE": str(release)})
    #   held in its first commit until the second run has been refused
    while b"test pause at shard-rename" not in log.read_bytes():
        assert first.poll() is None, log.read_text()
        time.sleep(0.01)

    started = time.monotonic()
    second = run_pipeline(*args, check=False)
    seconds = time.monotonic() - started

    assert second.returncode == 73, second.stderr
    assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    print(f"second run refused in {seconds:.1f} s")
    release.touch()
    assert first.wait(timeout=120) == 0, log.read_text()
    assert sorted(ds.dataset(str(tmp_path / "out")).to_table().column("path").to_pylist()) == \
        sorted(p.relative_to(tmp_path / "in").as_posix() for p in (tmp_path / "in").rglob("*.*"))


@pytest.mark.slow
def test_decode_workers_do_not_keep_the_lock_of_a_killed_run(tmp_path):
    """Workers forked by the DataLoader inherited the lock's descriptor, so after a kill -9 of the main process its
    orphaned workers held the flock on (seconds, over a minute in a slow decode) and a prompt restart exited 73."""
    make_corpus(tmp_path / "in", 40)
    out = tmp_path / "out"
    log = (tmp_path / "log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "classify", str(tmp_path / "in"), str(out), "--weights", "random",
         "--device", "cpu", "--workers", "2", "--batch-size", "2", "--shard-size", "4"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_TEST_PAUSE": "shard-write",
             "PIPELINE_TEST_PAUSE_S": "60"})
    try:
        deadline = time.monotonic() + 120
        while "test pause at shard-write" not in (tmp_path / "log").read_text():
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        workers = [pid for pid in group_members(run.pid) if pid != run.pid]
        assert workers, "the decode workers should be alive while the main process pauses"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert [pid for pid in group_members(run.pid) if pid in workers], "orphaned workers should still be alive"
        assert not held(RunFolder(out).existing_lock_file("output"))
    finally:
        for pid in group_members(run.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()
