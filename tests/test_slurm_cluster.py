"""The Slurm test harness itself: arrays, requeue and srun on a real one-node cluster."""
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster"]  # the session fixture slurm_cluster
pytestmark = pytest.mark.slurm


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body)
    path.chmod(0o755)
    return path


def test_array_job_runs_every_task(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "task.sh", """
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > "task_$SLURM_ARRAY_TASK_ID.txt"
echo "log of task $SLURM_ARRAY_TASK_ID"
""")
    job = slurm_cluster.sbatch(["--array=0-2", f"--chdir={tmp_path}",
                                f"--output={tmp_path}/%A_%a.log", str(script)])

    states = slurm_cluster.wait(job, timeout=30)

    assert states == {f"{job}_{task}": "COMPLETED" for task in range(3)}
    for task in range(3):
        assert (tmp_path / f"task_{task}.txt").read_text() == f"{task} 3\n"
        assert (tmp_path / f"{job}_{task}.log").read_text() == f"log of task {task}\n"


def test_running_array_task_can_be_requeued(slurm_cluster, tmp_path):
    # Task 1 sleeps on its first start only; every start appends a line.
    script = write_script(tmp_path / "task.sh", """
echo "start restart=${SLURM_RESTART_COUNT:-0}" >> "starts_$SLURM_ARRAY_TASK_ID.txt"
if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ ! -e ran_once ]; then
    touch ran_once
    sleep 300
fi
echo done >> "starts_$SLURM_ARRAY_TASK_ID.txt"
""")
    job = slurm_cluster.sbatch(["--array=0-1", f"--chdir={tmp_path}",
                                f"--output={tmp_path}/%A_%a.log", str(script)])
    task = f"{job}_1"
    deadline = time.monotonic() + 30
    while not (tmp_path / "ran_once").exists() or slurm_cluster.states(task) != {task: "RUNNING"}:
        assert time.monotonic() < deadline, f"task never ran: {slurm_cluster.states(job)}"
        time.sleep(0.2)

    slurm_cluster.requeue(task)
    states = slurm_cluster.wait(job, timeout=60)

    assert states == {f"{job}_0": "COMPLETED", task: "COMPLETED"}
    assert (tmp_path / "starts_0.txt").read_text() == "start restart=0\ndone\n"
    assert (tmp_path / "starts_1.txt").read_text() == (
        "start restart=0\nstart restart=1\ndone\n")


def test_srun_inside_batch_script_starts_two_tasks(slurm_cluster, tmp_path):
    script = write_script(tmp_path / "steps.sh", """
srun --ntasks=2 bash -c 'echo "$SLURM_PROCID of $SLURM_NTASKS" > "proc_$SLURM_PROCID.txt"'
""")
    job = slurm_cluster.sbatch(["--ntasks=2", f"--chdir={tmp_path}",
                                f"--output={tmp_path}/%j.log", str(script)])

    assert slurm_cluster.wait(job, timeout=30) == {job: "COMPLETED"}, \
        (tmp_path / f"{job}.log").read_text()
    assert (tmp_path / "proc_0.txt").read_text() == "0 of 2\n"
    assert (tmp_path / "proc_1.txt").read_text() == "1 of 2\n"
