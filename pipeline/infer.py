"""Run batches through the model on the device: uint8 in, normalisation on the device, float32 logits out."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.decode import Batch
from pipeline.gpu_decode import GpuDecoder, decode_ahead

_logger = logging.getLogger(__name__)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this process ('cuda' or 'cpu', checked by pipeline.prepare): on a GPU, the local rank's
    (local_rank % visible GPUs), made the current one."""
    if name != "cuda":
        return torch.device(name)
    default_allocator_settings(os.environ)
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)  # before any CUDA work: streams, events and pinned memory of this thread use it
    return device


def default_allocator_settings(environ) -> None:
    """Expandable CUDA segments unless the user configured PyTorch's allocator; read when CUDA starts.

    Batches of differently sized images fragment fixed segments: peak 15.6 GiB reserved at batch 256
    on an H100, 5.1 GiB with expandable ones (docs/benchmarks.md).
    """
    if not any(name in environ for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"


@dataclass
class Scored:
    """Model results of one batch, on the host; rows of the arrays follow the batch's ok items."""

    batch: Batch
    logits: np.ndarray  # float32 [n_ok, classes]
    topk_labels: np.ndarray  # int32 [n_ok, k], best first
    topk_probs: np.ndarray  # float32 [n_ok, k]


class Classifier:
    """The model on its device, in its precision, with the normalisation of its weights."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mean: list[float], std: list[float], topk: int,
                 dtype: torch.dtype = torch.float32, decoder: GpuDecoder | None = None, *, classes: int):
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        # cudnn.benchmark stays off: on an H100 its tuning added 0.4-1.3 s to the first forward and the
        #   tuned forward was no faster (docs/benchmarks.md)
        started = time.monotonic()
        self.model = model.to(device=device, dtype=dtype, memory_format=self.memory_format).eval()
        _logger.debug("the model is on %s after %.2f s", device, time.monotonic() - started)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.topk = topk
        self.classes = classes
        self.decoder = decoder  # None: the workers decoded every image
        self.first_launch: float | None = None  # monotonic time the first batch went to the device
        self._warming: list[threading.Thread] = []

    def start_warm_up(self) -> None:
        """On a GPU, start nvJPEG and load the model's kernels, on two threads, while the workers start and read.

        Each first call costs about 0.7 s (docs/benchmarks.md), waiting in C++ without the GIL, so
        both go by beside the workers' start; the first real batch then finds them ready.
        """
        if self.device.type != "cuda" or self.decoder is None:  # on a GPU the decoder is always there
            return
        size = self.decoder.preprocess.crop_size  # the shape of every batch decode_ahead hands the model
        steps = [functools.partial(self._first_forward, (self.decoder.batch_size, 3, size, size)),
                 self.decoder.warm_up]
        self._warming = [threading.Thread(target=self._warm_up, args=(step,), name="warm-up") for step in steps]
        for thread in self._warming:
            thread.start()

    def _warm_up(self, step: Callable[[], None]) -> None:
        torch.cuda.set_device(self.device)  # a new thread starts on GPU 0, whatever the main thread uses
        try:
            step()
        except Exception as error:  # the real batches meet the same error and report it
            _logger.debug("warm-up failed: %s", error)

    def _first_forward(self, batch_shape: tuple[int, ...]) -> None:
        started = time.monotonic()
        with torch.inference_mode():  # on the default stream, as the real batches: its memory is theirs after
            self.forward(torch.zeros(batch_shape, device=self.device, dtype=self.dtype))
            torch.cuda.current_stream(self.device).synchronize()
        _logger.debug("the model's first forward took %.2f s", time.monotonic() - started)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, top-k labels and top-k probabilities of a batch of 0..255 pixels on the device."""
        x = (images.float() / 255 - self.mean) / self.std  # the weights' transforms' own steps, in their order
        x = x.to(self.dtype, memory_format=self.memory_format)
        logits = self.model(x).float()
        probs, labels = torch.softmax(logits, dim=1).topk(self.topk, dim=1)
        return logits, labels.int(), probs

    def score(self, batches: Iterable[Batch]) -> Iterator[Scored]:
        """Score batches in order, one batch in flight on the device while the previous is read back."""
        in_flight: deque = deque()
        try:
            with torch.inference_mode():
                for batch, images, count in self._staged(batches):
                    in_flight.append(self._launch(batch, images, count))
                    if len(in_flight) > 1:
                        yield self._collect(*in_flight.popleft())
                while in_flight:
                    yield self._collect(*in_flight.popleft())
        finally:
            for thread in self._warming:
                thread.join()

    def _staged(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor, int]]:
        """Each batch with its images on the device, decoded ahead in a thread when there is a GPU."""
        if self.decoder is None:
            yield from ((batch, batch.images, len(batch.images)) for batch in batches)
        elif self.device.type == "cuda":
            yield from decode_ahead(batches, self.decoder)
        else:  # the GPU path's code on the CPU: for tests
            yield from ((batch, *self.decoder.images(batch)) for batch in batches)

    def _launch(self, batch: Batch, images: torch.Tensor, count: int):
        if self.first_launch is None:
            self.first_launch = time.monotonic()
            _logger.info("first batch on %s", self.device)
        if count == 0:
            return batch, None, None
        outputs = tuple(t[:count] for t in self.forward(images))
        if self.device.type != "cuda":
            return batch, outputs, None
        host = tuple(t.to("cpu", non_blocking=True) for t in outputs)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return batch, host, done

    def _collect(self, batch: Batch, outputs, done) -> Scored:
        if outputs is None:
            classes = self.classes
            return Scored(batch, np.empty((0, classes), np.float32), np.empty((0, self.topk), np.int32),
                          np.empty((0, self.topk), np.float32))
        if done is not None:
            done.synchronize()
        logits, labels, probs = (t.numpy() for t in outputs)
        return Scored(batch, logits, labels, probs)
