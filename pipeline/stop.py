"""Stop a run cleanly on SIGTERM, SIGINT or SIGUSR1: nothing partial committed, workers shut down, resumable."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # Slurm preemption/time limit, Ctrl-C, --signal=USR1
WORKER_GRACE_S = 5.0  # how long a decode worker may take to finish its item before it is killed


class Interrupted(BaseException):
    """A stop signal ended the run early; every committed shard stays, the same command resumes.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way mistakes it for a failure."""


class Stop:
    """What the signal handlers set: before classification begins a signal ends the run at once (nothing is in
    flight); once batches flow it only asks the loop to stop taking new ones."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self.immediate = True

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, number: int, frame) -> None:  # runs in the main thread, between bytecodes
        if self.signal is None:
            self.signal = signal.Signals(number)
        if self.immediate:
            raise Interrupted(f"interrupted by {self.signal.name} before classification began")

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches until a stop is requested; then its workers are shut down, none left behind."""
        self.immediate = False
        iterator = None
        try:
            while not self.requested:
                if iterator is None:
                    iterator = iter(loader)  # starts the workers
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                yield batch
            _logger.warning("%s received: taking no new batches, finishing the ones in flight", self.signal.name)
        finally:
            _shut_down(iterator)

    def check(self, committed: int, total: int) -> None:
        """Raise Interrupted when a signal stopped the run before every shard was committed."""
        if self.requested and committed < total:
            raise Interrupted(f"interrupted by {self.signal.name} with {committed} of {total} shards committed "
                              "(nothing partial is visible): resume by running the same command")


def _shut_down(iterator) -> None:
    """Stop the DataLoader's worker processes now rather than when the iterator is garbage-collected."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator (private, stable)
    if shutdown is not None:
        shutdown()
    for child in multiprocessing.active_children():  # a worker still busy: it ignores SIGTERM, so kill it
        child.join(WORKER_GRACE_S)
        if child.is_alive():
            _logger.warning("decode worker %d did not exit in %.0f s: killing it", child.pid, WORKER_GRACE_S)
            child.kill()
            child.join()


@contextmanager
def on_signals() -> Iterator[Stop]:
    """Route the stop signals to a Stop for the duration of a run, then restore the previous handlers."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        _logger.debug("not in the main thread: stop signals keep their handlers")
        yield stop
        return
    previous = {number: signal.signal(number, stop._handle) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def ignore_in_worker() -> None:
    """In a decode worker: a signal sent to the whole process group (Ctrl-C, Slurm) is the main process's to
    handle; the worker keeps decoding until the main process shuts it down."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
