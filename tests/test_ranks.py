"""Rank and world size from the launchers' variables (as a real Slurm and torchrun set them), flags, and refusals."""

import pytest

from pipeline.lock import Locked
from pipeline.ranks import Rank, RankError, detect, hold
from pipeline.runfolder import RunFolder

# What Slurm 22 set in the batch step and in an srun step of `sbatch --array=1-5:2 --ntasks=2` (array task 3),
# captured on this project's one-node test cluster.
ARRAY = {"SLURM_ARRAY_JOB_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "3",
         "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
BATCH_STEP = {**ARRAY, "SLURM_JOB_ID": "3", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
              "SLURM_PROCID": "0", "SLURM_NODEID": "0"}
SRUN_STEP = {**ARRAY, "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
             "SLURM_STEP_NUM_TASKS": "2"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, (0, 1, 0)),
    ({k: v for k, v in BATCH_STEP.items() if not k.startswith("SLURM_ARRAY")}, (0, 1, 0)),  # the batch shell
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "0",
      "SLURM_ARRAY_TASK_MAX": "4"}, (4, 5, 0)),
    (ARRAY, (1, 3, 0)),  # --array=1-5:2: task 3 is the second of three
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "7",
      "SLURM_ARRAY_TASK_MAX": "7"}, (0, 1, 0)),  # one task resubmitted alone: it takes every shard left
    (BATCH_STEP, (1, 3, 0)),  # the job's SLURM_NTASKS=2 does not count: the batch script is one process
    ({k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_ARRAY")}, (1, 2, 1)),
    (SRUN_STEP, (3, 6, 1)),  # array index 1 of 3, each with 2 srun tasks: 1 * 2 + 1 of 3 * 2
    (TORCHRUN, (5, 8, 1)),
    ({**TORCHRUN, **{k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_ARRAY")}}, (5, 8, 1)),
])
def test_rank_and_world_size_from_the_launchers(environ, expected):
    rank = detect(environ)
    assert (rank.rank, rank.world_size, rank.local_rank) == expected


def test_flags_replace_the_environment_but_the_gpu_follows_the_local_rank():
    assert detect(SRUN_STEP, rank=2, world_size=3) == Rank(2, 3, 1, "--rank/--world-size")
    assert detect({}, rank=5, world_size=8).local_rank == 5
    assert detect({"RANK": "x"}, rank=0, world_size=2).rank == 0  # the flags win over broken variables


@pytest.mark.parametrize(("environ", "flags", "message"), [
    ({}, {"rank": 1}, "together"),
    ({}, {"rank": 2, "world_size": 2}, r"rank 2 .* must be in 0\.\.1"),
    ({"RANK": "1"}, {}, "RANK and WORLD_SIZE must be set together"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, {}, r"rank 4 \(from torchrun"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, {}, "RANK='one' is not an integer"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2"}, {}, "from srun"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_STEP": "1"}, {}, "not a list"),  # --array=1,4
])
def test_contradictions_are_refused_naming_the_fix(environ, flags, message):
    with pytest.raises(RankError, match=message):
        detect(environ, **flags)


def test_the_ranks_share_out_every_shard_exactly_once():
    shares = [detect({}, rank=r, world_size=3).shards(8) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert detect({}, rank=4, world_size=5).shards(3) == []  # more ranks than shards: nothing to do


def test_each_local_rank_gets_its_own_gpu_and_makes_it_current(monkeypatch):
    import torch

    from pipeline.infer import pick_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)

    devices = [pick_device("cuda", local_rank) for local_rank in range(6)]

    assert devices == [torch.device("cuda", i) for i in (0, 1, 2, 3, 0, 1)] == current
    assert pick_device("cpu", 3) == torch.device("cpu") and len(current) == 6


def rank(r: int, world_size: int) -> Rank:
    return Rank(r, world_size, 0, "test")


def test_a_rank_writes_alone_and_never_beside_another_world_size(tmp_path):
    folder = RunFolder(tmp_path)
    with hold(folder, rank(0, 2)), hold(folder, rank(1, 2)):  # the ranks of one world write side by side
        with pytest.raises(Locked, match="pid"):
            with hold(folder, rank(1, 2)):  # rank 1 started twice
                pass
        with pytest.raises(Locked, match="world size 2, not 3.*--world-size 2 --rank R"):
            with hold(folder, rank(2, 3)):  # it would share the shards out differently
                pass
        with pytest.raises(Locked):
            with hold(folder, rank(0, 1)):  # a single process: it would do every shard
                pass
    with hold(folder, rank(2, 3)):  # once they have ended, the run may go on with another world size
        with pytest.raises(Locked, match="world size 3, not 2"):
            with hold(folder, rank(0, 2)):
                pass
    with hold(folder, rank(0, 1)):
        with pytest.raises(Locked):
            with hold(folder, rank(0, 2)):
                pass
