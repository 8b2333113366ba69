"""Stop signals: the loop stops taking batches, workers ignore group signals and are shut down, the run resumes."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import decode, guard, stop
from pipeline.decode import Sample
from pipeline.verify import Check, verify_output
from scripts.kill_loop import RUN_COLUMNS
from tests.conftest import REPO, make_corpus, run_pipeline, write_image
from tests.test_hostile import slow_jpeg

OPTIONS = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--shard-size", "8", "--workers", "2",
           "--progress", "log"]


def test_a_stop_signal_ends_the_batches_and_no_worker_is_left(monkeypatch):
    loader = DataLoader(range(400), batch_size=2, num_workers=2, worker_init_fn=decode._quiet_worker)
    previous = signal.getsignal(signal.SIGTERM)
    taken = []
    with stop.on_signals() as stopping:
        for batch in stopping.batches(loader):
            taken.append(batch)
            workers = multiprocessing.active_children()
            if len(taken) == 2:  # what Ctrl-C or Slurm sends to every process of the group
                for worker in workers:
                    for number in stop.STOP_SIGNALS:
                        os.kill(worker.pid, number)
            if len(taken) == 6:
                assert len(workers) == 2 and all(worker.exitcode is None for worker in workers)
                os.kill(os.getpid(), signal.SIGTERM)

    assert len(taken) == 6, "no batch is taken after the signal"
    assert multiprocessing.active_children() == []
    assert stopping.signal == signal.SIGTERM
    with pytest.raises(stop.Interrupted, match="SIGTERM with 3 of 5 shards committed"):
        stopping.check(3, 5)
    stopping.check(5, 5)  # every shard committed: the run is done, not interrupted
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_before_classification_ends_the_run_at_once():
    started = time.monotonic()
    with pytest.raises(stop.Interrupted, match="SIGUSR1 before classification began"):
        with stop.on_signals():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)
    assert time.monotonic() - started < 1


class Items(Dataset):
    """What guard.batches takes: items with plan indices, each a decoded Sample."""

    def __init__(self, count):
        self.indices = list(range(count))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        return Sample(position, image=torch.zeros((3, 2, 2), dtype=torch.uint8))


@pytest.mark.parametrize("ending", ["failure", "signal"])
def test_workers_started_before_the_first_batch_end_with_the_run(ending):
    """The runner starts the workers while the model loads: a failure or a signal then must not orphan them."""
    with pytest.raises((RuntimeError, stop.Interrupted)):
        with stop.on_signals() as stopping:
            stopping.batches(guard.batches(Items(50), 2, 2, pin_memory=False))  # the workers start now
            assert len(multiprocessing.active_children()) == 2
            if ending == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # cut short by the signal
            raise RuntimeError("the disk failed while the model was loading")

    assert multiprocessing.active_children() == []


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def start(input_dir, output_dir, log, env=None):
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(input_dir), str(output_dir),
                                 *OPTIONS], env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                stderr=stderr, start_new_session=True)


def wait_for(condition, process, what):
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(0.005)


def signal_group_and_time_exit(process, number) -> float:
    started = time.monotonic()
    os.killpg(process.pid, number)  # as Slurm and Ctrl-C do: the job and its decode workers
    process.wait(timeout=60)
    return time.monotonic() - started


def visible_tables(out):
    return {path.name: ds.dataset(str(path)).to_table() for path in out.glob("*.parquet")}


@pytest.mark.slow
def test_sigterm_mid_commit_exits_75_quickly_keeps_that_shard_and_resumes_exactly(tmp_path):
    make_corpus(tmp_path / "in", 32, size=(40, 32))
    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "whole"), *OPTIONS)
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(tmp_path / "in", out, log, {"PIPELINE_TEST_PAUSE": "shard-rename", "PIPELINE_TEST_PAUSE_S": "1"})
    wait_for(lambda: log.read_bytes().count(b"test pause at shard-rename") == 2, process, "its second commit")

    seconds = signal_group_and_time_exit(process, signal.SIGTERM)

    stderr = log.read_text()
    print(f"exit {process.returncode} {seconds:.2f} s after SIGTERM")
    assert process.returncode == 75, stderr
    assert "interrupted by SIGTERM" in stderr and "resume by running the same command" in stderr
    assert seconds < 30
    assert group_members(process.pid) == [], "decode workers outlived the run"
    tables = visible_tables(out)
    assert any(name.startswith("part-00001-") for name in tables), "the shard being committed was finished"
    assert 2 <= len(tables) < 4 and all(table.num_rows == 8 for table in tables.values())
    assert not list(out.rglob(".*.tmp")) and not (out / "_SUCCESS").exists()
    assert verify_output(out).exit_code == Check.UNFINISHED

    run_pipeline("classify", str(tmp_path / "in"), str(out), *OPTIONS)

    resumed, whole = (ds.dataset(str(folder)).to_table().sort_by("path") for folder in (out, tmp_path / "whole"))
    assert resumed.drop_columns(RUN_COLUMNS).equals(whole.drop_columns(RUN_COLUMNS))
    assert len(resumed.column("run_id").unique()) == 1, "the resumed rows belong to the first run"
    assert verify_output(out).exit_code == Check.OK


@pytest.mark.slow
@pytest.mark.parametrize(("number", "moment"), [(signal.SIGINT, "running"), (signal.SIGUSR1, "planning")])
def test_sigint_and_sigusr1_stop_the_run_too(tmp_path, number, moment):
    make_corpus(tmp_path / "in", 24, size=(40, 32))
    out, log = tmp_path / "out", tmp_path / "run.log"
    if moment == "planning":
        process = start(tmp_path / "in", out, log, {"PIPELINE_TEST_PAUSE": "plan-write", "PIPELINE_TEST_PAUSE_S": "20"})
        wait_for(lambda: b"test pause at plan-write" in log.read_bytes(), process, "planning")
    else:  # held in its first commit, so that the signal surely lands mid-run
        pause = {"PIPELINE_TEST_PAUSE": "shard-rename", "PIPELINE_TEST_PAUSE_S": "1"}
        process = start(tmp_path / "in", out, log, pause)
        wait_for(lambda: b"test pause at shard-rename" in log.read_bytes(), process, "its first commit")

    seconds = signal_group_and_time_exit(process, number)

    print(f"{number.name} while {moment}: exit {process.returncode} {seconds:.2f} s after the signal")
    assert process.returncode == 75, log.read_text()
    assert f"interrupted by {number.name}" in log.read_text()
    assert seconds < 30
    assert group_members(process.pid) == []
    assert not list(out.rglob(".*.tmp")) and not (out / "_SUCCESS").exists()
    assert all(table.num_rows == 8 for table in visible_tables(out).values()) and len(visible_tables(out)) < 3
    if moment == "planning":
        assert not (out / "_plan.arrow").exists() and seconds < 5, "the 20 s pause was cut short"


def _loading_torch(pid: int) -> bool:
    """Whether the process has begun loading torch's shared library (its import then runs for seconds)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_sigusr1_while_torch_imports_exits_75_and_writes_nothing(tmp_path):
    """Slurm's USR1 can reach a task that has just started (a requeued one, say) while it still imports torch: it
    must exit 75, which the sbatch scripts requeue on, not die of the signal (a srun step failed so, once)."""
    make_corpus(tmp_path / "in", 2, size=(40, 32))
    out, log = tmp_path / "out", tmp_path / "run.log"
    process = start(tmp_path / "in", out, log)
    wait_for(lambda: _loading_torch(process.pid), process, "torch was imported")

    signal_group_and_time_exit(process, signal.SIGUSR1)

    assert process.returncode == 75, log.read_text()
    assert "interrupted by SIGUSR1 before classification began" in log.read_text()
    assert not out.exists(), "nothing is written before the checks and the model are done"


@pytest.mark.slow
def test_sigterm_while_the_workers_decode_slow_files_ends_the_run_within_seconds(tmp_path):
    """Both workers deep in files that take a minute each: the wait for their batches ends at the signal, the
    workers are killed, and the run exits 75 in seconds, inside Slurm's 30 s KillWait."""
    root = tmp_path / "in"
    for i in (1, 3):
        write_image(root / f"a{i}.jpg", i, size=(40, 32))
    slow_jpeg(root / "a0-slow.jpg")  # batch 0, worker 0
    slow_jpeg(root / "a2-slow.jpg")  # batch 1, worker 1
    out, log = tmp_path / "out", tmp_path / "run.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(root), str(out), "--weights",
                                    "random", "--device", "cpu", "--batch-size", "2", "--workers", "2", "--progress",
                                    "log"], env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=stderr,
                                   start_new_session=True)
    try:
        wait_for(lambda: b"classifying 4 images" in log.read_bytes(), process, "classification began")
        time.sleep(3)  # the workers are decoding the slow files now

        seconds = signal_group_and_time_exit(process, signal.SIGTERM)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    print(f"exit {process.returncode} {seconds:.2f} s after SIGTERM")
    assert process.returncode == 75, log.read_text()
    assert "interrupted by SIGTERM while waiting for decoded images" in log.read_text()
    assert seconds < 10
    assert group_members(process.pid) == [], "decode workers outlived the run"
    assert not list(out.glob("*.parquet")) and not list(out.rglob(".*.tmp"))
