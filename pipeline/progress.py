"""Tell a person (a tqdm bar) or a log (periodic lines, for cron and Slurm) how far the run is."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

_logger = logging.getLogger(__name__)


class Progress:
    """Counts images and errors; shows a bar at a terminal, else logs a line every few seconds."""

    def __init__(self, total: int, done: int, mode: str, log_every_s: float):
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True) if use_bar else None
        self.total, self.done, self.errors = total, done, 0
        self.log_every_s = log_every_s
        self.started = self.last_log = time.monotonic()
        self.images_this_run = 0

    def update(self, images: int, errors: int) -> None:
        self.done += images
        self.errors += errors
        self.images_this_run += images
        if self.bar is not None:
            self.bar.update(images)
            self.bar.set_postfix(errors=self.errors, refresh=False)
        elif time.monotonic() - self.last_log >= self.log_every_s:
            self.last_log = time.monotonic()
            _logger.info("%d/%d images, %.0f img/s, %d errors", self.done, self.total, self.rate(), self.errors)

    def rate(self) -> float:
        return self.images_this_run / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Waiting:
    """Time spent blocked on an iterator (the DataLoader): the part of a run the device waited on reading."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, items: Iterable) -> Iterator:
        iterator, first = iter(items), True
        while True:
            started = time.monotonic()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.monotonic() - started
            if first:
                _logger.debug("first batch from the workers")
                first = False
            yield item
