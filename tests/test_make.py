"""`make classify` as a user runs it: a real make process on this repository's Makefile, in its own process group.

A finished run exits 0 with Parquet written; a run Python refuses shows Python's code in make's `Error N` line while
make itself exits 2 (GNU make always does: schedulers call .venv/bin/pipeline for exact codes); a SIGTERM sent to
make alone reaches Python (the recipe `exec`s it), and make waits for it, so nothing of the run outlives make.

Uses the repository's own .venv (`make test` creates it); skipped when `make install` would (re)install.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, write_image

pytestmark = pytest.mark.slow

_MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")  # an outer `make test`'s, not ours


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _MAKE_VARIABLES}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module", autouse=True)
def installed():
    """The repository's .venv must be there and up to date: a test must not install packages."""
    check = subprocess.run(["make", "-C", str(REPO), "-q", "install"], env=_env(), capture_output=True)
    if check.returncode != 0 or not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip(f"{REPO / '.venv'} missing or out of date: run `make install` (make test does) first")


def _images(folder: Path, count: int) -> Path:
    for i in range(count):
        write_image(folder / f"img{i:03d}.jpg", seed=i, size=(64 + i % 5, 48 + i % 3))
    return folder


def _make(tmp_path: Path, input_dir: Path, output_dir: Path, args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    """Starts `make classify` as its own process group's leader; its stdout and stderr go to a log file."""
    log = tmp_path / f"make-{output_dir.name}.log"
    command = ["make", "-C", str(REPO), "classify", f"INPUT={input_dir}", f"OUTPUT={output_dir}", "WEIGHTS=random",
               f"ARGS=--device cpu --workers 0 {args}"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(**env),
                                   start_new_session=True)
    return process, log


def _group_left(pgid: int) -> list[str]:
    """The command lines of the processes still in the group pgid."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # after ")": state, ppid, pgrp
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, IndexError, ValueError):
            continue
    return left


def _cleanup(process: subprocess.Popen) -> None:
    """Kills whatever of the group is left (a failed test's leftovers), never raising."""
    if process.poll() is None or _group_left(process.pid):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _finish(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        _cleanup(process)


def test_a_finished_run_exits_0_with_its_parquet(tmp_path):
    images = _images(tmp_path / "in", 3)
    process, log = _make(tmp_path, images, tmp_path / "out", "")

    code = _finish(process, timeout=300)

    assert code == 0, log.read_text()
    shards = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert shards and sum(pq.read_metadata(shard).num_rows for shard in shards) == 3
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_a_refused_run_shows_pythons_code_and_make_exits_2(tmp_path):
    process, log = _make(tmp_path, tmp_path / "does-not-exist", tmp_path / "out", "")

    code = _finish(process, timeout=300)

    text = log.read_text()
    assert code == 2, text
    assert "Error 2" in text and "does-not-exist" in text, text


def test_too_many_errors_is_error_3_in_makes_line_but_make_exits_2(tmp_path):
    images = _images(tmp_path / "in", 3)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    process, log = _make(tmp_path, images, tmp_path / "out", "--max-error-rate 0.1")

    code = _finish(process, timeout=300)

    text = log.read_text()
    assert code == 2, text
    assert "Error 3" in text, text


def test_sigterm_to_make_alone_stops_python_before_make_exits(tmp_path):
    images = _images(tmp_path / "in", 60)
    process, log = _make(tmp_path, images, tmp_path / "out", "--shard-size 10 --batch-size 10",
                         PIPELINE_TEST_PAUSE="shard-write@1", PIPELINE_TEST_PAUSE_S="60",
                         PIPELINE_TEST_RELEASE=str(tmp_path / "release"))
    try:
        deadline = time.monotonic() + 240
        while "test pause" not in log.read_text():
            assert process.poll() is None, f"make ended before the pause:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no test pause in the log:\n{log.read_text()}"
            time.sleep(0.2)
        python = [line for line in _group_left(process.pid) if "-m pipeline classify" in line]
        assert python, "Python should be running in make's process group"

        os.kill(process.pid, signal.SIGTERM)  # make alone, as `kill PID` or a supervisor would
        time.sleep(3)  # make passes the signal on at once; Python's handler notes it (and logs it after the pause)
        (tmp_path / "release").touch()
        process.wait(timeout=120)
        left = _group_left(process.pid)
    finally:
        _cleanup(process)

    text = log.read_text()
    assert not left, f"left running after make exited: {left}\n{text}"
    # then exit 75, or 0 when every batch left was already in flight
    assert any("SIGTERM" in line and " pipeline" in line for line in text.splitlines()), \
        f"Python never got the signal (no log line of the job names it):\n{text}"
    assert process.returncode == -signal.SIGTERM, text  # make waited for Python, then ended by the signal itself
