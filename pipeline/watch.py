"""Watch a loader's decode workers: notice one that ended badly (SIGCHLD, raised only while the main thread waits
for a batch) and note which item each worker is decoding since when (shared memory), for pipeline.guard."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

from torch.utils.data import Dataset, get_worker_info


class WorkerDied(Exception):
    """A decode worker died; str() says how, e.g. 'killed by SIGSEGV'; timed_out: the items (positions) it was
    killed for, with how long they had been decoding."""

    def __init__(self, how: str, timed_out: dict[int, float] | None = None):
        super().__init__(how)
        self.timed_out = timed_out or {}


class Clock:
    """Which item each worker of a loader is decoding, since when: shared memory that the workers write (through
    Timed) and the main process reads. Three doubles a worker: pid, position, start (monotonic; 0: idle)."""

    def __init__(self, workers: int):
        self.slots = multiprocessing.RawArray("d", 3 * workers)

    def start(self, worker: int, position: int) -> None:
        base = 3 * worker
        self.slots[base + 2] = 0.0  # idle while the other two change
        self.slots[base], self.slots[base + 1] = os.getpid(), position
        self.slots[base + 2] = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process

    def stop(self, worker: int) -> None:
        self.slots[3 * worker + 2] = 0.0

    def busy(self) -> list[tuple[int, int, float]]:
        """(pid, position, seconds) of each worker decoding an item now."""
        now, found = time.monotonic(), []
        for base in range(0, len(self.slots), 3):
            pid, position, started = self.slots[base : base + 3]
            if started > 0 and pid > 0:
                found.append((int(pid), int(position), now - started))
        return found


class Timed(Dataset):
    """The dataset, each item's decoding noted on the clock while a worker is on it."""

    def __init__(self, dataset: Dataset, clock: Clock):
        self.dataset, self.clock = dataset, clock

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        worker = get_worker_info()
        if worker is None:
            return self.dataset[position]
        self.clock.start(worker.id, position)
        try:
            return self.dataset[position]
        finally:
            self.clock.stop(worker.id)


def is_death(error: Exception, watch: ChildWatch) -> bool:
    """Whether next(loader) failed because a worker died: seen by our handler, by the DataLoader's liveness check,
    or as a broken transfer (a batch a worker had sent is passed by file descriptor, which dies with it)."""
    return (watch.death is not None or isinstance(error, (WorkerDied, EOFError, OSError))
            or (isinstance(error, RuntimeError) and "DataLoader worker" in str(error)))


def wait_for_bad_end(seconds: float = 2.0) -> str | None:
    """How a child died, waiting a moment: a broken transfer can be seen before the dying worker is a zombie."""
    deadline = time.monotonic() + seconds
    while (how := bad_end_of_a_child()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return how


class ChildWatch:
    """SIGCHLD handler: notes a child that ended badly; raises it only while the loop waits in next()."""

    def __init__(self):
        self.death: str | None = None
        self.waiting = False
        self.installed = False

    def install(self):
        """Handle SIGCHLD from now on; returns the handler it replaces."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(os, "waitid"):
            return None  # then the DataLoader's own liveness check finds deaths
        self.installed = True
        return signal.signal(signal.SIGCHLD, self)

    def uninstall(self, previous) -> None:
        if self.installed:
            signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)

    def __call__(self, signum, frame) -> None:
        how = bad_end_of_a_child()
        if how is None:
            return
        self.death = how
        if self.waiting:
            raise WorkerDied(how)


def bad_end_of_a_child() -> str | None:
    """How an ended child process died, if it did not exit cleanly; it stays unreaped for its owner."""
    try:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or (info.si_code == os.CLD_EXITED and info.si_status == 0):
        return None
    if info.si_code == os.CLD_EXITED:
        return f"exited with status {info.si_status}"
    try:
        return f"killed by {signal.Signals(info.si_status).name}"
    except ValueError:
        return f"killed by signal {info.si_status}"
