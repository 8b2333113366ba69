"""Survive decode workers that die (segfault, OOM kill) or hang on a file: find the file, give it an error row, go on.

How a death is noticed: PyTorch's own SIGCHLD handler raises the death in whatever the main thread
happens to be doing (the model's forward, the writer), which would end the job. While our loaders
run, a handler of ours takes its place: it only notes a child that ended badly, and raises the
death inside `next(loader)` alone, where the loop below expects it. Deaths are also found by the
DataLoader's own liveness check, so nothing depends on the signal arriving. Afterwards the
handler from before is put back; PyTorch installs its own only once per process, so from the first
guarded loader on, other loaders of this process rely on that liveness check alone.

How a file that decodes too long is noticed: each worker notes in shared memory which item it is on since when
(Clock). The wait for a batch looks every POLL_S; a worker on one item for longer than the decode time limit is
killed, and that item is remembered as timed out: from there on it is a death like any other, except that the
timed-out item is not decoded again (it gets its error row). A wait longer than SLOW_WAIT_S is logged with what
the workers are decoding.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator

from torch.utils.data import Dataset, Subset

from pipeline import causes
from pipeline.causes import Unusable
from pipeline.decode import PREFETCH, Batch, Sample, collate, join, make_loader
from pipeline.watch import ChildWatch, Clock, Timed, WorkerDied, is_death, wait_for_bad_end

_logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often the wait for a batch looks at what the workers are decoding
SLOW_WAIT_S = 15.0  # a wait for a batch longer than this is logged (and again every SLOW_WAIT_S)


def batches(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool,
            decode_timeout: float | None = None) -> Iterator[Batch]:
    """Batches of the dataset's items in order, each item exactly once, whatever happens to the workers.

    dataset is an ImageFiles (anything with its samples and `indices`). The workers start now. On a
    death, the items not yet received of the window the workers could have been holding (workers x
    PREFETCH batches) are decoded again by one worker, one at a time, in order; then normal batching
    resumes after it. An item a worker decodes for longer than decode_timeout seconds gets an error row.
    With workers=0 decoding happens in this process, where a crashing decoder ends the job and no time
    limit applies.
    """
    if workers == 0 or len(dataset) == 0:
        return iter(make_loader(dataset, batch_size, 0, pin_memory))
    guard = _Guard(dataset, batch_size, workers, pin_memory, decode_timeout)
    return guard.run(guard.iterate(range(len(dataset)), batch_size, workers, pin_memory))


class _Guard:
    def __init__(self, dataset: Dataset, batch_size: int, workers: int, pin_memory: bool, limit: float | None):
        self.dataset, self.batch_size, self.workers, self.pin_memory = dataset, batch_size, workers, pin_memory
        self.limit = limit  # seconds one item may take; None: no limit

    def run(self, loader: Iterator[Batch]) -> Iterator[Batch]:
        start = 0
        try:
            while True:
                received = start
                try:
                    for batch in loader:
                        received += len(batch.errors)
                        yield batch
                    return
                except WorkerDied as death:
                    stop = min(received + self.workers * PREFETCH * self.batch_size, len(self.dataset))
                    _logger.warning("a decode worker died (%s): decoding the %d items it may have held one by one to "
                                    "find the culprit", death, stop - received)
                    timed_out = death.timed_out
                yield from self._one_at_a_time(range(received, stop), timed_out)
                if stop == len(self.dataset):
                    return
                start = stop
                loader = self.iterate(range(start, len(self.dataset)), self.batch_size, self.workers,
                                      self.pin_memory)
        finally:
            loader.close()  # closed early (a stop): its workers end now, not when the garbage is collected

    def _one_at_a_time(self, positions: range, timed_out: dict[int, float]) -> Iterator[Batch]:
        """The items at positions, decoded by a single worker in order, regrouped into batches of batch_size."""
        pending: list[Batch] = []
        for one in self._singles(positions, dict(timed_out)):
            pending.append(one)
            if len(pending) == self.batch_size:
                yield self._joined(pending)
                pending = []
        if pending:
            yield self._joined(pending)

    def _singles(self, positions: range, timed_out: dict[int, float]) -> Iterator[Batch]:
        """One batch per item. A single worker is given one item at a time (prefetch 1), so the item missing when it
        dies is the suspect; it is decoded again alone, in a fresh worker, to tell a culprit from a bystander. An
        item that timed out is not decoded again: it took the whole limit once already."""
        position = positions.start
        while position < positions.stop:
            if position in timed_out:
                yield self._timed_out(position, timed_out[position])
                position += 1
                continue
            end = min([later for later in timed_out if later > position] + [positions.stop])
            try:
                for one in self.iterate(range(position, end), 1, 1, False, prefetch=1):
                    position += 1
                    yield one
            except WorkerDied as death:
                if position in death.timed_out:
                    timed_out[position] = death.timed_out[position]
                    continue
                yield self._alone(position)
                position += 1

    def _alone(self, position: int) -> Batch:
        """The item decoded by a worker of its own: its batch, or its error row when that worker dies too."""
        try:
            (one,) = list(self.iterate([position], 1, 1, False, prefetch=1))
            _logger.info("item %d decodes alone: the worker died of something else", self.dataset.indices[position])
            return one
        except WorkerDied as death:
            if position in death.timed_out:
                return self._timed_out(position, death.timed_out[position])
            _logger.warning("%s killed its decode worker twice (%s): it gets an error row", self._name(position),
                            death)
            return self._error_row(position, str(Unusable(causes.CRASHED, str(death))))

    def _timed_out(self, position: int, seconds: float) -> Batch:
        _logger.warning("%s was still decoding after %.0f s, over the decode time limit of %g s: its worker was "
                        "killed, it gets an error row", self._name(position), seconds, self.limit)
        return self._error_row(position, str(Unusable(causes.TIMED_OUT, f"over {self.limit:g} s")))

    def _error_row(self, position: int, error: str) -> Batch:
        return collate([Sample(self.dataset.indices[position], error=error)])

    def _joined(self, batches: list[Batch]) -> Batch:
        joined = join(batches)
        return joined.pin_memory() if self.pin_memory else joined

    def _name(self, position: int) -> str:
        """The item as a log line names it: its path when the dataset knows it."""
        name = getattr(self.dataset, "name", None)
        return name(position) if name is not None else f"item {self.dataset.indices[position]}"

    def iterate(self, positions, batch_size: int, workers: int, pin_memory: bool,
                prefetch: int = PREFETCH) -> Iterator[Batch]:
        """A loader's batches of the items at positions; its workers start now. A worker's death, or an item over the
        time limit, raises WorkerDied in the iteration, between batches, and nowhere else."""
        clock = Clock(workers)
        watch = ChildWatch()
        previous = watch.install()
        try:
            loader = iter(make_loader(Subset(Timed(self.dataset, clock), positions), batch_size, workers, pin_memory,
                                      prefetch, timeout=POLL_S))
        except BaseException:
            watch.uninstall(previous)
            raise
        watch.install()  # again: PyTorch puts its own handler in place when its first loader starts
        return self._drain(loader, watch, previous, clock)

    def _drain(self, loader: Iterator[Batch], watch: ChildWatch, previous, clock: Clock) -> Iterator[Batch]:
        ended = False
        try:
            try:
                while (batch := self._next(loader, watch, clock)) is not None:
                    yield batch
                ended = True
            finally:
                # Shut the workers down now, with our handler still in place: the loader's __del__ would wait for the
                # reference cycle of the death's traceback, and PyTorch's handler would raise the death once more. A
                # loader left before its end (a death, a stop) is killed first: nothing its workers hold is wanted,
                # and a worker deep in a slow file would hold the shutdown up.
                if not ended:
                    for worker in getattr(loader, "_workers", []):
                        worker.kill()
                shutdown = getattr(loader, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
                del loader
        finally:
            watch.uninstall(previous)

    def _next(self, loader: Iterator[Batch], watch: ChildWatch, clock: Clock) -> Batch | None:
        """The loader's next batch, None at its end; WorkerDied when a worker died or an item took too long."""
        waiting_since = time.monotonic()
        logged = 0
        while True:
            death = watch.death
            if death is None:
                watch.waiting = True
                try:
                    return next(loader)
                except StopIteration:
                    return None
                except Exception as error:
                    if not str(error).startswith("DataLoader timed out"):  # POLL_S went by: look at the workers
                        if not is_death(error, watch):
                            raise
                        death = watch.death or wait_for_bad_end() or f"lost ({type(error).__name__}: {error})"
                finally:
                    watch.waiting = False
            if death is not None:
                raise WorkerDied(death)
            pinning = getattr(loader, "_pin_memory_thread", None)  # with a timeout, torch no longer checks it
            if pinning is not None and not pinning.is_alive():
                raise RuntimeError("Pin memory thread exited unexpectedly")
            busy = clock.busy()
            over = {position: seconds for _, position, seconds in busy if self.limit and seconds > self.limit}
            if over:
                for pid, position, _ in busy:
                    if position in over:
                        os.kill(pid, signal.SIGKILL)
                raise WorkerDied(f"decode timed out after {self.limit:g} s", timed_out=over)
            waited = time.monotonic() - waiting_since
            if waited >= SLOW_WAIT_S * (logged + 1):
                logged += 1
                decoding = "; ".join(f"{self._name(position)} for {seconds:.0f} s"
                                     for _, position, seconds in sorted(busy, key=lambda item: -item[2])[:4])
                _logger.warning("waited %.0f s for the next decoded batch; the workers are decoding: %s (time limit "
                                "%s)", waited, decoding or "nothing", f"{self.limit:g} s" if self.limit else "none")
