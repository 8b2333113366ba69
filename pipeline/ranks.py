"""Which share of the one plan this process does: its rank, the world size and its GPU, from Slurm, torchrun or flags.

Rank r of a world of W processes does the shards k with k % W == r. The sources, and how they combine:

- torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), or else an ``srun`` task (``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; only inside a job step: a batch script's own ``SLURM_PROCID=0`` and
  ``SLURM_NTASKS`` describe the job, not this process), or else one process: the group of processes of one job;
- a Slurm job array (``SLURM_ARRAY_TASK_ID`` among ``SLURM_ARRAY_TASK_MIN``..``MAX`` by ``STEP``, ``COUNT`` tasks):
  each array task is one such group, so rank = array index * group size + rank in the group;
- ``--rank``/``--world-size`` replace all of that (the local rank, for the GPU, still comes from the environment).

hold() takes the locks under which a rank writes (pipeline/lock.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import lock
from pipeline.config import Refused

if TYPE_CHECKING:
    from pipeline.runfolder import RunFolder


class RankError(Refused):
    """The rank variables contradict each other; the message names the fix."""


@dataclass(frozen=True)
class Rank:
    rank: int  # this process's index, 0 <= rank < world_size
    world_size: int  # how many processes share the plan
    local_rank: int  # this process's index on its node: it uses GPU local_rank % visible GPUs
    source: str  # where rank and world size came from, for the log

    def shards(self, shard_count: int) -> list[int]:
        """The shards of a plan of shard_count shards that this rank does."""
        return list(range(self.rank, shard_count, self.world_size))

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} (from {self.source}), local rank {self.local_rank}"


def _int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise RankError(f"{name}={text!r} is not an integer: unset it, or pass --rank and --world-size") from None


def _checked(rank: int, world_size: int, local_rank: int, source: str) -> Rank:
    if world_size < 1:
        raise RankError(f"world size {world_size} (from {source}) must be at least 1")
    if not 0 <= rank < world_size:
        raise RankError(f"rank {rank} (from {source}) must be in 0..{world_size - 1}: fix the launcher's variables, "
                        "or pass --rank and --world-size")
    if local_rank < 0:
        raise RankError(f"local rank {local_rank} (from {source}) must not be negative")
    return Rank(rank, world_size, local_rank, source)


def _group(environ: Mapping[str, str]) -> Rank:
    """The processes of one job: torchrun's, an srun step's, or just this one."""
    rank, world_size = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise RankError("RANK and WORLD_SIZE must be set together (torchrun sets both): unset the one that is "
                            "set, or pass --rank and --world-size")
        return _checked(rank, world_size, _int(environ, "LOCAL_RANK") or 0, "torchrun RANK/WORLD_SIZE")
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        world_size = _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS")
        if world_size is None:
            raise RankError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS: "
                            "pass --rank and --world-size")
        return _checked(_int(environ, "SLURM_PROCID"), world_size, _int(environ, "SLURM_LOCALID") or 0,
                        "srun SLURM_PROCID/SLURM_STEP_NUM_TASKS")
    return Rank(0, 1, 0, "a single process")


def _array(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(index of this task, task count) of a Slurm job array, or None outside one."""
    task = _int(environ, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = _int(environ, "SLURM_ARRAY_TASK_COUNT")
    low = _int(environ, "SLURM_ARRAY_TASK_MIN")
    high = _int(environ, "SLURM_ARRAY_TASK_MAX")
    step = _int(environ, "SLURM_ARRAY_TASK_STEP") or 1
    low = task if low is None else low
    high = task if high is None else high
    if count is None:
        count = (high - low) // step + 1
    if step < 1 or (high - low) % step or (high - low) // step + 1 != count or (task - low) % step \
            or not low <= task <= high:
        raise RankError(
            f"Slurm array task {task} of {low}-{high}:{step} ({count} tasks) is not one of an evenly spaced range: "
            "submit the array as --array=0-N (a range, optionally with :step and %limit, not a list), or pass "
            "--rank and --world-size")
    return (task - low) // step, count


def detect(environ: Mapping[str, str], rank: int | None = None, world_size: int | None = None) -> Rank:
    """This process's rank: --rank/--world-size when given, else from the launcher's environment variables."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise RankError("pass --rank and --world-size together")
        local = _int(environ, "LOCAL_RANK")
        local = _int(environ, "SLURM_LOCALID") if local is None else local
        return _checked(rank, world_size, rank if local is None else local, "--rank/--world-size")
    group = _group(environ)
    array = _array(environ)
    if array is None:
        return group
    index, count = array
    source = "Slurm array SLURM_ARRAY_TASK_ID" + (f" and {group.source}" if group.world_size > 1 else "")
    return _checked(index * group.world_size + group.rank, count * group.world_size, group.local_rank, source)


def _world_lock(world_size: int) -> str:
    return f"world-{world_size:05d}"


def refuse_if_busy(folder: RunFolder, rank: Rank) -> None:
    """Before the slow start of a run (torch's import, the weights): lock.Locked at once when hold() would refuse
    for a writer already there. Creates nothing; hold() still decides."""
    if rank.world_size == 1:
        lock.refuse_if_held(folder.existing_lock_file("output"))
        return
    lock.refuse_if_held(folder.existing_lock_file("output"), shared=True)
    lock.refuse_if_held(folder.existing_lock_file(f"rank-{rank.rank:05d}"))


@contextmanager
def hold(folder: RunFolder, rank: Rank) -> Iterator[None]:
    """The locks this process writes under, for the duration; lock.Locked at once when it must not write.

    A single process holds the run folder's lock alone (no other writer at all). A rank of N holds it shared with
    the other ranks, holds `world-N` shared with the ranks of the same world size, and `rank-R` alone (one process
    per rank). A process of another world size shares the shards out differently, so the two must never write at
    the same time: each rank first takes its world's lock, then checks that no other world's is held; of two
    worlds starting together at least one sees the other. Once every process of a world has ended, a run may
    resume with another world size.
    """
    if rank.world_size == 1:
        with lock.acquire(folder.lock_file("output")):
            yield
        return
    own = _world_lock(rank.world_size)
    with lock.acquire(folder.lock_file("output"), shared=True), lock.acquire(folder.lock_file(own), shared=True):
        for name in folder.lock_names("world-"):
            if name != own and lock.held(folder.existing_lock_file(name)):
                raise lock.Locked(
                    f"{folder.path} is being written by ranks of a run of world size {int(name[6:])}, not "
                    f"{rank.world_size}: they share the shards out differently. Wait for them to end or stop them, "
                    f"or start this process with --world-size {int(name[6:])} --rank R to stand in for rank R")
        with lock.acquire(folder.lock_file(f"rank-{rank.rank:05d}")):
            yield
