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

from pipeline.lock import Locked, acquire, lock_path
from tests.conftest import REPO, make_corpus, run_pipeline


def test_a_second_holder_is_refused_with_the_first_ones_details(tmp_path):
    with acquire(tmp_path) as path:
        assert path == lock_path(tmp_path, "output") and path.parent.name.startswith("_")
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(Locked) as refused:
            with acquire(tmp_path):
                pass
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started {holder['started']}" in message
    with acquire(tmp_path):  # released on exit
        pass


def test_shared_holders_exclude_an_exclusive_one_but_not_each_other(tmp_path):
    with acquire(tmp_path, shared=True), acquire(tmp_path, shared=True):
        with pytest.raises(Locked, match="holds the lock shared"):
            with acquire(tmp_path):
                pass
        with acquire(tmp_path, "rank-00001"):  # a rank's own lock is another file
            pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pipeline.lock import acquire\n"
                               "with acquire(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(Locked, match=f"pid {holder.pid} "):
        with acquire(tmp_path):
            pass

    holder.send_signal(signal.SIGKILL)
    holder.wait()

    with acquire(tmp_path) as path:  # the kernel released the dead holder's lock
        assert json.loads(path.read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_concurrent_run_on_the_same_output_fails_fast_and_the_first_finishes(tmp_path):
    make_corpus(tmp_path / "in", 12, size=(40, 32))
    args = ["classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random", "--shard-size", "4",
            "--workers", "1", "--progress", "log"]
    log = tmp_path / "first.log"
    with open(log, "wb") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_TEST_PAUSE": "shard-rename@1",
                                      "PIPELINE_TEST_PAUSE_S": "20"})  # held in its first commit, long enough
    #   for the second run to start even on a loaded machine (1 s a shard was not: the first had finished)
    while b"test pause at shard-rename" not in log.read_bytes():
        assert first.poll() is None, log.read_text()
        time.sleep(0.01)

    started = time.monotonic()
    second = run_pipeline(*args, check=False)
    seconds = time.monotonic() - started

    assert second.returncode == 73, second.stderr
    assert f"is being written by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    print(f"second run refused in {seconds:.1f} s")
    assert first.wait(timeout=120) == 0, log.read_text()
    assert sorted(ds.dataset(str(tmp_path / "out")).to_table().column("path").to_pylist()) == \
        sorted(p.relative_to(tmp_path / "in").as_posix() for p in (tmp_path / "in").rglob("*.*"))
