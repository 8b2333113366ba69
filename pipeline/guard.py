"""Survive decode workers that die (segfault, OOM kill): find the file that killed one, give it an error row, go on.

How a death is noticed: PyTorch's own SIGCHLD handler raises the death in whatever the main thread
happens to be doing (the model's forward, the writer), which would end the job. While our loaders
run, a handler of ours takes its place: it only notes a child that ended badly, and raises the
death inside `next(loader)` alone, where the loop below expects it. Deaths are also found by the
DataLoader's own 5-second liveness check, so nothing depends on the signal arriving. Afterwards the
handler from before is put back; PyTorch installs its own only once per process, so from the first
guarded loader on, other loaders of this process rely on that liveness check alone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

from torch.utils.data import Dataset, Subset

from pipeline import causes
from pipeline.causes import Unusable
from pipeline.decode import PREFETCH, Batch, Sample, collate, join, make_loader

_logger = logging.getLogger(__name__)


class WorkerDied(Exception):
    """A decode worker died; str() says how, e.g. 'killed by SIGSEGV'."""


def batches(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool) -> Iterator[Batch]:
    """Batches of the dataset's items in order, each item exactly once, whatever happens to the workers.

    dataset is an ImageFiles (anything with its samples and `indices`). The workers start now. On a
    death, the items not yet received of the window the workers could have been holding (workers x
    PREFETCH batches) are decoded again by one worker, one at a time, in order; then normal batching
    resumes after it. With workers=0 decoding happens in this process, where a crashing decoder ends the job.
    """
    if workers == 0 or len(dataset) == 0:
        return iter(make_loader(dataset, batch_size, 0, pin_memory))
    first = _iterate(Subset(dataset, range(len(dataset))), batch_size, workers, pin_memory)
    return _guarded(dataset, first, batch_size, workers, pin_memory)


def _guarded(dataset: Dataset, loader: Iterator[Batch], batch_size: int, workers: int,
             pin_memory: bool) -> Iterator[Batch]:
    start = 0
    while True:
        received = start
        try:
            for batch in loader:
                received += len(batch.errors)
                yield batch
            return
        except WorkerDied as death:
            stop = min(received + workers * PREFETCH * batch_size, len(dataset))
            _logger.warning("a decode worker died (%s): decoding the %d items it may have held one by one to find "
                            "the culprit", death, stop - received)
        yield from _one_at_a_time(dataset, range(received, stop), batch_size, pin_memory)
        if stop == len(dataset):
            return
        start = stop
        loader = _iterate(Subset(dataset, range(start, len(dataset))), batch_size, workers, pin_memory)


def _one_at_a_time(dataset: Dataset, positions: range, batch_size: int, pin_memory: bool) -> Iterator[Batch]:
    """The items at positions, decoded by a single worker in order, regrouped into batches of batch_size."""
    pending: list[Batch] = []
    for one in _singles(dataset, positions):
        pending.append(one)
        if len(pending) == batch_size:
            yield _joined(pending, pin_memory)
            pending = []
    if pending:
        yield _joined(pending, pin_memory)


def _singles(dataset: Dataset, positions: range) -> Iterator[Batch]:
    """One batch per item. A single worker is given one item at a time (prefetch 1), so the item missing when it
    dies is the suspect; it is decoded again alone, in a fresh worker, to tell a culprit from a bystander."""
    position = positions.start
    while position < positions.stop:
        try:
            for one in _iterate(Subset(dataset, range(position, positions.stop)), 1, 1, False, prefetch=1):
                position += 1
                yield one
        except WorkerDied:
            yield _alone(dataset, position)
            position += 1


def _alone(dataset: Dataset, position: int) -> Batch:
    """The item decoded by a worker of its own: its batch, or its error row when that worker dies too."""
    try:
        (one,) = list(_iterate(Subset(dataset, [position]), 1, 1, False, prefetch=1))
        _logger.info("item %d decodes alone: the worker died of something else", dataset.indices[position])
        return one
    except WorkerDied as death:
        error = str(Unusable(causes.CRASHED, str(death)))
        _logger.warning("item %d killed its decode worker twice (%s): it gets an error row",
                        dataset.indices[position], death)
        return collate([Sample(dataset.indices[position], error=error)])


def _joined(batches: list[Batch], pin_memory: bool) -> Batch:
    joined = join(batches)
    return joined.pin_memory() if pin_memory else joined


def _iterate(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool,
             prefetch: int = PREFETCH) -> Iterator[Batch]:
    """A loader's batches; its workers start now. A worker's death raises WorkerDied in the iteration,
    between batches, and nowhere else."""
    watch = _ChildWatch()
    previous = watch.install()
    try:
        loader = iter(make_loader(dataset, batch_size, workers, pin_memory, prefetch))
    except BaseException:
        watch.uninstall(previous)
        raise
    watch.install()  # again: PyTorch puts its own handler in place when its first loader starts
    return _drain(loader, watch, previous)


def _drain(loader: Iterator[Batch], watch: _ChildWatch, previous) -> Iterator[Batch]:
    try:
        try:
            while True:
                death = watch.death
                if death is None:
                    watch.waiting = True
                    try:
                        batch = next(loader)
                    except StopIteration:
                        return
                    except Exception as error:
                        if not _is_death(error, watch):
                            raise
                        death = watch.death or _wait_for_bad_end() or f"lost ({type(error).__name__}: {error})"
                    finally:
                        watch.waiting = False
                if death is not None:
                    raise WorkerDied(death)
                yield batch
        finally:
            # Shut the workers down now, with our handler still in place: the loader's __del__ would wait for the
            # reference cycle of the death's traceback, and PyTorch's handler would raise the death once more.
            shutdown = getattr(loader, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del loader
    finally:
        watch.uninstall(previous)


def _is_death(error: Exception, watch: _ChildWatch) -> bool:
    """Whether next(loader) failed because a worker died: seen by our handler, by the DataLoader's liveness check,
    or as a broken transfer (a batch a worker had sent is passed by file descriptor, which dies with it)."""
    return (watch.death is not None or isinstance(error, (WorkerDied, EOFError, OSError))
            or (isinstance(error, RuntimeError) and "DataLoader worker" in str(error)))


def _wait_for_bad_end(seconds: float = 2.0) -> str | None:
    """How a child died, waiting a moment: a broken transfer can be seen before the dying worker is a zombie."""
    deadline = time.monotonic() + seconds
    while (how := _bad_end_of_a_child()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return how


class _ChildWatch:
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
        how = _bad_end_of_a_child()
        if how is None:
            return
        self.death = how
        if self.waiting:
            raise WorkerDied(how)


def _bad_end_of_a_child() -> str | None:
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
