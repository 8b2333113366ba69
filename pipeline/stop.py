"""Stop a run cleanly on SIGTERM, SIGINT or SIGUSR1: nothing partial committed, workers shut down, resumable."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # Slurm preemption/time limit, Ctrl-C, --signal=USR1
WORKER_GRACE_S = 5.0  # how long decode workers still alive after their loader's shutdown may take, all together,
#   before they are killed


class Interrupted(BaseException):
    """A stop signal ended the run early; every committed shard stays, the same command resumes.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way mistakes it for a failure."""


class Stop:
    """What the signal handlers set: before classification begins a signal ends the run at once (nothing is being
    committed); once batches flow it asks the loop to stop taking new ones, and when the loop is waiting for the
    next batch (the workers may be deep in a slow file) it ends the wait at once."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self.immediate = True
        self.waiting = False  # the loop is waiting for its next batch (Batches.__next__)
        self._sources: list[Batches] = []

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, number: int, frame) -> None:  # runs in the main thread, between bytecodes
        if self.signal is None:
            self.signal = signal.Signals(number)
        if self.immediate:
            raise Interrupted(f"interrupted by {self.signal.name} before classification began")
        if self.waiting:  # the main thread only waits: as the run unwinds, the writer commits the whole shards in
            self.waiting = False  # flight, and the workers are killed (their batches are not wanted)
            raise Interrupted(f"interrupted by {self.signal.name} while waiting for decoded images: committed "
                              "shards are kept (nothing partial is visible); resume by running the same command")

    def batches(self, source: Iterable) -> Batches:
        """source's batches until a stop is requested; its workers end with the run, however the run ends."""
        batches = Batches(self, source)
        self._sources.append(batches)
        return batches

    def check(self, committed: int, total: int) -> None:
        """Raise Interrupted when a signal stopped the run before every shard was committed."""
        if self.requested and committed < total:
            raise Interrupted(f"interrupted by {self.signal.name} with {committed} of {total} shards committed "
                              "(nothing partial is visible): resume by running the same command")

    def close(self) -> None:
        for batches in self._sources:
            batches.close()


class Batches:
    """An iterator over a batch source (a DataLoader iterator, or a generator around some) that ends when a stop is
    requested; close() ends the source and its decode workers. It alone holds the source, so that closing it frees
    the DataLoader even when an exception's traceback still holds the runner's frame."""

    def __init__(self, stop: Stop, source: Iterable):
        self.stop = stop
        self.source: Iterator | None = iter(source)  # a DataLoader's workers start here

    def __iter__(self) -> Batches:
        return self

    def __next__(self):
        self.stop.immediate = False  # from the first batch on, a signal only sets the flag
        if self.source is not None and self.stop.requested:
            _logger.warning("%s received: taking no new batches, finishing the ones in flight", self.stop.signal.name)
            self.close()
        if self.source is None:
            raise StopIteration
        self.stop.waiting = True
        try:
            return next(self.source)
        finally:
            self.stop.waiting = False

    def close(self) -> None:
        """End the source now: a generator is closed (its DataLoaders shut their workers down), a DataLoader
        iterator shut down; then any decode worker still alive after WORKER_GRACE_S is killed."""
        source, self.source = self.source, None
        if source is None:
            return
        for end in ("close", "_shutdown_workers"):  # generators; torch's multi-process iterator (private, stable)
            try:
                getattr(source, end, lambda: None)()
            except Exception as error:  # never hide the error that may be ending the run
                _logger.warning("shutting the decode workers down: %s: %s", type(error).__name__, error)
        del source  # the last reference: a DataLoader iterator not yet started is shut down by its __del__
        deadline = time.monotonic() + WORKER_GRACE_S
        for child in multiprocessing.active_children():
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():  # a worker busy past the grace: it ignores SIGTERM, so kill it
                _logger.warning("decode worker %d did not exit in %.0f s: killing it", child.pid, WORKER_GRACE_S)
                child.kill()
                child.join()


@contextmanager
def on_signals() -> Iterator[Stop]:
    """Route the stop signals to a Stop for the duration of a run, then restore the previous handlers."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        _logger.debug("not in the main thread: stop signals keep their handlers")
        try:
            yield stop
        finally:
            stop.close()
        return
    previous = {number: signal.signal(number, stop._handle) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        try:
            stop.close()  # the workers end here on every path: done, stopped, or failed
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def ignore_in_worker() -> None:
    """In a decode worker: a signal sent to the whole process group (Ctrl-C, Slurm) is the main process's to
    handle; the worker keeps decoding until the main process shuts it down.

    So SIGTERM no longer ends a worker: multiprocessing's exit-time terminate() cannot, and a loader must be shut
    down explicitly before the process exits (Stop.batches does it on every path)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
