"""jobs/: the Slurm array and srun scripts on a real one-node Slurm, the cron script with a real flock."""

import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.commit import MANIFEST_NAME
from pipeline.plan import load_plan
from tests.conftest import REPO, make_corpus, write_image
from tests.held_image import HeldImage

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
    assert run_ids == [load_plan(out).run_id]
    assert f'"rows": {len(expected)},' in (out / MANIFEST_NAME).read_text()


def submit(cluster, script: Path, tmp_path: Path, *sbatch_args: str, env=ENV) -> str:
    exports = ",".join(["ALL", *(f"{key}={value}" for key, value in env.items())])
    return cluster.sbatch([f"--chdir={tmp_path}", f"--export={exports}", *NO_GPU, *sbatch_args, str(script),
                           str(tmp_path / "in"), str(tmp_path / "out"), *OPTIONS])


def shard_files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


@pytest.mark.slurm
@pytest.mark.slow
def test_an_array_job_classifies_every_image_exactly_once_also_when_a_task_is_requeued(slurm_cluster, tmp_path):
    for i in range(12):  # 6 shards of 2: task 0 does shards 0, 2, 4 and task 1 shards 1, 3, 5
        write_image(tmp_path / "in" / f"img{i:02d}.png", i, size=(40, 32))
    (tmp_path / "in" / "img10.png").unlink()
    # in shard 5: task 1 waits there, shard 3 in flight, shard 1 committed (one batch stays in flight)
    held = HeldImage(tmp_path / "in" / "img10.png", write_image(tmp_path / "img10.png", 10, size=(40, 32)))
    out = tmp_path / "out"
    try:
        job = submit(slurm_cluster, ARRAY, tmp_path, "--array=0-1")
        task = f"{job}_1"
        deadline = time.monotonic() + 90
        while not list((out / "_shards").glob("part-00001-*.json")) or slurm_cluster.states(task)[task] != "RUNNING":
            assert time.monotonic() < deadline, f"task 1 never committed shard 1: {slurm_cluster.states(job)}"
            time.sleep(0.1)
        before = shard_files(out)

        slurm_cluster.requeue(task)
        held.feed()
        states = slurm_cluster.wait(job, timeout=120)
    finally:
        held.close()

    logs = {task: (tmp_path / f"classify-{job}_{task}.log").read_text() for task in range(2)}
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, logs
    assert_exactly_once(out, [f"img{i:02d}.png" for i in range(12)])
    assert "rank 0 of 2 (from Slurm array SLURM_ARRAY_TASK_ID)" in logs[0]
    assert "restart 0" in logs[1] and "restart 1" in logs[1], "task 1 ran twice, its log appended"
    assert logs[1].count("classifying 6 images (3 shards)") == 1, "its first start"
    assert logs[1].count("classifying 4 images (2 shards)") == 1, "its restart: only shards 3 and 5"
    after = shard_files(out)
    assert {name: after[name] for name in before} == before, "what was committed before the requeue stays"
    assert sum(log.count(f"published {MANIFEST_NAME}") for log in logs.values()) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_stopped_ahead_of_its_time_limit_requeues_itself_and_resumes(slurm_cluster, tmp_path):
    for i in range(10):  # 5 shards of 2, all for the one task
        write_image(tmp_path / "in" / f"img{i:02d}.png", i, size=(40, 32))
    (tmp_path / "in" / "img04.png").unlink()
    held = HeldImage(tmp_path / "in" / "img04.png", write_image(tmp_path / "img04.png", 4, size=(40, 32)))
    out = tmp_path / "out"
    try:
        job = submit(slurm_cluster, ARRAY, tmp_path, "--array=0")
        task = f"{job}_0"
        deadline = time.monotonic() + 90
        while not list((out / "_shards").glob("part-00000-*.json")):  # it waits on shard 2, shard 1 in flight
            assert time.monotonic() < deadline, f"shard 0 never committed: {slurm_cluster.states(job)}"
            time.sleep(0.1)

        # what --signal=B:USR1@300 does 5 minutes before the time limit: USR1 to the batch script alone
        slurm_cluster.run("scancel", "--batch", "--signal=USR1", task)
        time.sleep(1)  # the script passes it on; Python stops taking batches once the held one is read
        held.feed()
        states = slurm_cluster.wait(job, timeout=120)
    finally:
        held.close()

    log = (tmp_path / f"classify-{job}_0.log").read_text()
    assert states == {task: "COMPLETED"}, log
    assert "USR1 received" in log and "requeueing task 0 to resume" in log
    assert "restart 1" in log and "classifying 4 images (2 shards)" in log, "shards 3 and 4 only"
    assert_exactly_once(out, [f"img{i:02d}.png" for i in range(10)])


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
def test_the_srun_variant_runs_one_rank_per_task_with_the_checkouts_python(slurm_cluster, tmp_path):
    expected = make_corpus(tmp_path / "in", 7, size=(40, 32))
    script = installed_copy(GPUS, tmp_path / "checkout")

    job = submit(slurm_cluster, script, tmp_path, "--ntasks-per-node=2", env={"PYTHON": "", "PYTHONPATH": REPO})
    states = slurm_cluster.wait(job, timeout=120)

    log = (tmp_path / f"classify-{job}.log").read_text()
    task_logs = [(tmp_path / f"classify-{job}-{task}.log").read_text() for task in range(2)]
    assert states == {job: "COMPLETED"}, log + "".join(task_logs)
    assert f"{tmp_path}/checkout/jobs/slurm/../../.venv/bin/python -m pipeline classify" in log
    assert_exactly_once(tmp_path / "out", expected)
    for task, task_log in enumerate(task_logs):
        assert f"rank {task} of 2 (from srun SLURM_PROCID/SLURM_STEP_NUM_TASKS), local rank {task}" in task_log


def nightly(tmp_path: Path, input_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(NIGHTLY), str(input_dir), str(tmp_path / "out"), *OPTIONS, *args],
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    assert_exactly_once(tmp_path / "out" / f"run_date={today}", expected)
    assert first.communicate()[0] == "" and overlapping.communicate()[0] == "", "everything goes to the log"
