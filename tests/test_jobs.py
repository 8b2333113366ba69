"""jobs/: the Slurm array and srun scripts on a real one-node Slurm, the cron script with a real flock."""

import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.runfolder import MANIFEST_NAME, RunFolder
from tests.conftest import REPO, make_corpus

pytest_plugins = ["tests.slurm_cluster"]  # the session fixture slurm_cluster

ARRAY = REPO / "jobs" / "slurm" / "classify.sbatch"
GPUS = REPO / "jobs" / "slurm" / "classify-gpus.sbatch"
NIGHTLY = REPO / "jobs" / "cron" / "nightly.sh"
OPTIONS = ["--weights", "random", "--device", "cpu", "--shard-size", "2", "--batch-size", "2", "--workers", "0"]
ENV = {"PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
# The scripts ask for a GPU and 8 CPUs per task; the test node has neither.
NO_GPU = ["--gres=none", "--cpus-per-task=1"]


def paths_of(out: Path) -> list[str]:
    return sorted(ds.dataset(str(out), format="parquet").to_table(columns=["path"])["path"].to_pylist())


def assert_exactly_once(out: Path, expected: list[str]) -> None:
    assert paths_of(out) == sorted(expected), "every image exactly once"
    run_ids = ds.dataset(str(out), format="parquet").to_table(columns=["run_id"])["run_id"].unique().to_pylist()
    assert run_ids == [RunFolder(out).load_plan().run_id]
    assert f'"rows": {len(expected)},' in (out / MANIFEST_NAME).read_text()


def submit(cluster, script: Path, tmp_path: Path, *sbatch_args: str, env=ENV) -> str:
    exports = ",".join(["ALL", *(f"{key}={value}" for key, value in env.items())])
    return cluster.sbatch([f"--chdir={tmp_path}", f"--export={exports}", *NO_GPU, *sbatch_args, str(script),
                           str(tmp_path / "in"), str(tmp_path / "out"), *OPTIONS])


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


# Each task pauses 3 s inside its 2nd shard commit (written and fsynced, not yet renamed): a known point to act at.
PAUSED = {**ENV, "PIPELINE_TEST_PAUSE": "shard-rename@2", "PIPELINE_TEST_PAUSE_S": "3"}


def wait_for_line(log: Path, line: str, cluster, job: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (log.exists() and line in log.read_text()):
        assert time.monotonic() < deadline, f"no {line!r} in {log}: {cluster.states(job)}"
        time.sleep(0.05)


def classified(log: str) -> list[tuple[int, int]]:
    """(images, shards) of every start's 'classifying' line in a task's log."""
    found = re.findall(r"classifying (\d+) images \((\d+) shards", log)
    return [(int(images), int(shards)) for images, shards in found]


@pytest.mark.slurm
@pytest.mark.slow
def test_an_array_job_classifies_every_image_exactly_once_though_its_tasks_are_stopped_and_requeued(
        slurm_cluster, tmp_path):
    expected = make_corpus(tmp_path / "in", 20, size=(40, 32))  # 10 shards: task 0 does 0, 2, 4, 6, 8; task 1 the rest
    out = tmp_path / "out"
    job = submit(slurm_cluster, ARRAY, tmp_path, "--array=0-1", env=PAUSED)
    logs = [tmp_path / f"classify-{job}_{task}.log" for task in range(2)]
    before = {}

    def requeue_task_1():  # Slurm stops it (SIGTERM, later SIGKILL) and starts it again
        before.update(shard_files(out))
        slurm_cluster.requeue(f"{job}_1")

    def stop_task_0():  # what --signal=B:USR1@300 does 5 minutes before the time limit: USR1 to the script alone
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_0")

    actions = {0: ("part-00002", stop_task_0), 1: ("part-00003", requeue_task_1)}
    deadline = time.monotonic() + 90
    while actions:  # act on each task while it is held, whichever gets there first
        for task, (shard, act) in list(actions.items()):
            if logs[task].exists() and f"test pause at shard-rename ({shard}" in logs[task].read_text():
                act()
                del actions[task]
        assert time.monotonic() < deadline, f"tasks {list(actions)} never paused: {slurm_cluster.states(job)}"
        time.sleep(0.05)

    states = slurm_cluster.wait(job, timeout=120)

    texts = [log.read_text() for log in logs]
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, texts
    assert_exactly_once(out, expected)
    assert "rank 0 of 2 (from Slurm array SLURM_ARRAY_TASK_ID)" in texts[0]
    assert "SIGUSR1 received" in texts[0] and "interrupted by SIGUSR1" in texts[0], "Python got it and exited 75"
    assert "requeueing task 0 to resume" in texts[0], "the script requeued it"
    assert "requeueing" not in texts[1], "Slurm requeued task 1 itself"
    for text in texts:
        assert "restart 0" in text and "restart 1" in text, "each task ran twice, its log appended"
        first, again = classified(text)  # stopped inside its 2nd commit: it commits at most what is in flight
        assert first == (10, 5) and 1 <= again[1] <= 4 and again[0] == 2 * again[1], "the restart did only the rest"
    after = shard_files(out)
    assert {name: after[name] for name in before} == before, "what was committed before the requeue stays"
    assert "part-00001" in " ".join(before) and "part-00003" not in " ".join(before)
    assert sum(text.count(f"published {MANIFEST_NAME}") for text in texts) == 1


def installed_copy(script: Path, repo: Path) -> Path:
    """script in a checkout at repo whose .venv/bin/python (what `make install` makes) runs this interpreter."""
    copy = repo / script.relative_to(REPO)
    copy.parent.mkdir(parents=True)
    shutil.copy2(script, copy)
    venv_python = repo / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    venv_python.chmod(0o755)
    return copy


@pytest.mark.slurm
@pytest.mark.slow
def test_the_srun_variant_runs_a_rank_per_task_and_requeues_itself_ahead_of_the_time_limit(slurm_cluster, tmp_path):
    expected = make_corpus(tmp_path / "in", 20, size=(40, 32))  # 10 shards, 5 a task
    script = installed_copy(GPUS, tmp_path / "checkout")  # and no PYTHON: it finds the checkout's .venv
    job = submit(slurm_cluster, script, tmp_path, "--ntasks-per-node=2", env={**PAUSED, "PYTHON": ""})
    task_logs = [tmp_path / f"classify-{job}-{task}.log" for task in range(2)]
    wait_for_line(task_logs[0], "test pause at shard-rename (part-00002", slurm_cluster, job)

    # what --signal=USR1@300 does 5 minutes before the time limit: USR1 to the job step's tasks
    slurm_cluster.run("scancel", "--signal=USR1", job)
    states = slurm_cluster.wait(job, timeout=120)

    log = (tmp_path / f"classify-{job}.log").read_text()
    texts = [task_log.read_text() for task_log in task_logs]
    assert states == {job: "COMPLETED"}, log + "".join(texts)
    assert f"{tmp_path}/checkout/jobs/slurm/../../.venv/bin/python -m pipeline classify" in log
    assert "requeueing job" in log and "restart 1" in log
    assert "SIGUSR1 received" in texts[0] and "interrupted by SIGUSR1" in texts[0]
    for task, text in enumerate(texts):
        assert text.count(f"rank {task} of 2 (from srun SLURM_PROCID/SLURM_STEP_NUM_TASKS), local rank {task}") == 2
    assert_exactly_once(tmp_path / "out", expected)


def nightly(tmp_path: Path, input_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The script as cron runs it, from a checkout whose .venv runs this interpreter (PYTHON unset)."""
    script = tmp_path / "checkout" / NIGHTLY.relative_to(REPO)
    if not script.exists():
        installed_copy(NIGHTLY, tmp_path / "checkout")
    return subprocess.Popen([str(script), str(input_dir), str(tmp_path / "out"), *OPTIONS, *args],
                            env={**os.environ, **ENV, "PYTHON": "", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_the_nightly_script_runs_incremental_nights_unless_told_not_to(tmp_path):
    expected = make_corpus(tmp_path / "in", 3, size=(40, 32))
    assert nightly(tmp_path, tmp_path / "in", env={"RUN_DATE": "2024-05-01"}).wait(timeout=120) == 0
    (tmp_path / "in" / "added.png").write_bytes((tmp_path / "in" / expected[1]).read_bytes())
    assert nightly(tmp_path, tmp_path / "in", env={"RUN_DATE": "2024-05-02"}).wait(timeout=120) == 0
    assert nightly(tmp_path, tmp_path / "in", env={"RUN_DATE": "2024-05-03", "INCREMENTAL": "0"}).wait(120) == 0

    def paths(date: str) -> list[str]:
        return sorted(pq.read_table(tmp_path / "out" / f"run_date={date}", columns=["path"])["path"].to_pylist())

    assert paths("2024-05-01") == expected
    assert paths("2024-05-02") == ["added.png"], (tmp_path / "out" / "_logs" / "nightly-2024-05-02.log").read_text()
    assert paths("2024-05-03") == sorted([*expected, "added.png"])


@pytest.mark.slow
def test_the_nightly_script_writes_tonights_partition_refuses_overlap_and_passes_exit_codes(tmp_path):
    expected = make_corpus(tmp_path / "in", 3, size=(40, 32))
    today = datetime.date.today().isoformat()
    log = tmp_path / "out" / "_logs" / f"nightly-{today}.log"

    first = nightly(tmp_path, tmp_path / "in")
    deadline = time.monotonic() + 30
    while not (log.exists() and "nightly run" in log.read_text()):  # it holds the lock before it logs this
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    overlapping = nightly(tmp_path, tmp_path / "in")
    assert overlapping.wait(timeout=30) == 73
    assert first.wait(timeout=120) == 0, log.read_text()
    failing = nightly(tmp_path, tmp_path / "missing")

    assert failing.wait(timeout=60) == 2, "the job's exit code is the script's"
    text = log.read_text()
    assert "another nightly run holds" in text and "does not exist" in text
    assert f"{tmp_path}/checkout/.venv/bin/python -m pipeline classify" in text
    assert_exactly_once(tmp_path / "out" / f"run_date={today}", expected)
    assert first.communicate()[0] == "" and overlapping.communicate()[0] == "", "everything goes to the log"
