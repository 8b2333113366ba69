"""On a GPU, which plain JPEGs Pillow decodes in the workers instead of nvJPEG, and how large that share is.

nvJPEG shares the GPU with the model, and on a machine whose decode workers mostly wait for it (an H200 with 16
cores: about 11,000 img/s, bound by the one GPU decoder) the workers can take part of its load. The share lives in
one double in shared memory: the main process sets it, each forked worker reads it for every item it reads. An
item's decoder is decided by its plan index and the share alone, so a resume with the same share routes the same
way; an adapted share does not repeat from run to run, and rows of the two decoders differ slightly (a logit cosine
of about 0.99997, within what docs/gpu.md publishes for the GPU path).
"""

from __future__ import annotations

import logging
import multiprocessing
import time

_logger = logging.getLogger(__name__)

GOLDEN = 0.6180339887498949  # an item's place in [0, 1) is index x this, mod 1: any run of consecutive indices,
#   a batch, covers [0, 1) about evenly (a Weyl sequence), so the share routed to Pillow is spread through every batch
MAX_CPU_SHARE = 0.5  # the most the controller gives the workers: a bound on an overshoot while its measurements
#   lag (a fixed --cpu-decode-share may go up to 1)
START = 0.1  # where the controller starts: at 0 the workers of the machine it was made for mostly wait, and each
#   step up takes a window
STEP = 0.02  # the share moves this much a window at most: the workers decode up to workers x 4 batches ahead, so
#   a change shows in the waits only some windows later
WINDOW = 16  # batches between two decisions (4,096 images at batch 256, about 0.4 s at 11,000 img/s)
LOADER_WAIT = 0.02  # the main loop waited for the workers more than this part of a window: the share goes down
DECODE_WAIT = 0.05  # else the model waited for the GPU decode threads more than this part of it: the share goes up


class DecoderShare:
    """The share of plain JPEGs decoded by Pillow in the workers: its shared value, the rule that routes an item by
    it, and the controller that adapts it after each batch (or keeps a fixed share)."""

    def __init__(self, fixed: float | None = None):
        self.fixed = fixed  # None: adapted as the run goes
        self._value = multiprocessing.RawValue("d", START if fixed is None else fixed)  # inherited by forked
        #   workers (the DataLoader's default on Linux), as pipeline.watch's Clock
        self._batches = 0
        self._sum = 0.0  # of the share after each batch, for the mean
        self._window_start: tuple[float, float, float] | None = None  # (time, loader wait, decode wait) then

    @property
    def value(self) -> float:
        return self._value.value

    @property
    def mean(self) -> float:
        """The share averaged over the batches the model got (the share as set, not as the workers had it)."""
        return self._sum / self._batches if self._batches else self.value

    def to_pillow(self, index: int) -> bool:
        """Whether the item of this plan index is decoded by Pillow in the worker; called there for every item."""
        return (index * GOLDEN) % 1.0 < self._value.value

    def after_batch(self, loader_waited: float, decode_waited: float, now: float | None = None) -> None:
        """Called by the main loop after each batch the model got, with the seconds it has waited so far for the
        workers (pipeline.progress.Waiting) and for the GPU decode threads (GpuDecoder.waited). Every WINDOW
        batches, an adapted share goes down a STEP when the workers were waited for more than LOADER_WAIT of the
        window, else up a STEP when the decode threads were waited for more than DECODE_WAIT of it."""
        now = time.monotonic() if now is None else now
        self._batches += 1
        self._sum += self.value
        if self.fixed is not None:
            return
        if self._window_start is None:  # the first batch: the wait for the workers to start is not a window's
            self._window_start = (now, loader_waited, decode_waited)
            return
        if self._batches % WINDOW != 1:
            return
        started, loader_before, decode_before = self._window_start
        self._window_start = (now, loader_waited, decode_waited)
        seconds = max(now - started, 1e-9)
        loader, decode = (loader_waited - loader_before) / seconds, (decode_waited - decode_before) / seconds
        step = -STEP if loader > LOADER_WAIT else STEP if decode > DECODE_WAIT else 0.0
        share = min(max(round(self.value + step, 6), 0.0), MAX_CPU_SHARE)
        if share != self.value:
            _logger.debug("cpu decode share %.2f -> %.2f (waited for the workers %.1f %%, for the GPU decoder "
                          "%.1f %% of the last %d batches)", self.value, share, 100 * loader, 100 * decode, WINDOW)
            self._value.value = share

    def describe(self) -> str:
        """The run's log line about it."""
        how = "adapted" if self.fixed is None else "fixed"
        return (f"Pillow in the workers decoded a share of the plain JPEGs ({how}): {self.value:.3f} at the end, "
                f"{self.mean:.3f} on average over {self._batches} batches")
