"""Decode a batch's JPEG bytes on the GPU (nvJPEG through torchvision), resize and crop them there.

The one place that knows the GPU decoder: torchvision marks its decoders deprecated in favour of
TorchCodec from 0.29 on, so swapping the library means changing this module only.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.functional import _compute_resized_output_size

from pipeline.decode import Batch, Preprocess, decode_bytes, describe_error

_logger = logging.getLogger(__name__)

RESIZE_CHUNK = 64  # images padded together for one roi_align call


class GpuDecoder:
    """Turns a Batch into one float NCHW tensor of 0..255 pixels on the device, of fixed batch size."""

    def __init__(self, device: torch.device, preprocess: Preprocess, batch_size: int, dtype: torch.dtype):
        self.device = device
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float32  # bf16 rounds 0..255

    def _decode_all(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG in one call; if it rejects the batch, file by file, so one bad file fails alone."""
        if not jpegs:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice
            try:
                return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                return [self._decode_one(data) for data in jpegs]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _crop_box(self, height: int, width: int) -> list[float]:
        """The center crop of the resized image, in the source image's coordinates."""
        p = self.preprocess
        resized_h, resized_w = _compute_resized_output_size((height, width), [p.resize_size])
        top = int(round((resized_h - p.crop_size) / 2.0))
        left = int(round((resized_w - p.crop_size) / 2.0))
        sy, sx = resized_h / height, resized_w / width
        return [left / sx, top / sy, (left + p.crop_size) / sx, (top + p.crop_size) / sy]

    def resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize-then-center-crop of every image, a few roi_align calls per batch (area sampling
        antialiases); agrees with Pillow's antialiased bilinear resize to a logit cosine of 0.9999.

        Images are padded to a common size per chunk of similar sizes, bounding the padding memory.
        """
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1] * images[i].shape[2])
        out = torch.empty((len(images), 3, self.preprocess.crop_size, self.preprocess.crop_size), dtype=self.dtype,
                          device=self.device)
        for start in range(0, len(order), RESIZE_CHUNK):
            chunk = order[start : start + RESIZE_CHUNK]
            at = torch.tensor(chunk).to(self.device, non_blocking=True)
            out.index_copy_(0, at, self._resize_chunk([images[i] for i in chunk]))
        return out

    def _resize_chunk(self, images: list[torch.Tensor]) -> torch.Tensor:
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        padded = torch.zeros((len(images), 3, height, width), dtype=self.dtype, device=self.device)
        boxes = []
        for i, image in enumerate(images):  # the per-image Python here is the decode thread's hot spot
            _, h, w = image.shape
            padded[i].narrow(1, 0, h).narrow(2, 0, w).copy_(image)
            boxes.append([i, *self._crop_box(h, w)])
        boxes_tensor = torch.tensor(boxes, dtype=self.dtype).to(self.device, non_blocking=True)
        return roi_align(padded, boxes_tensor, output_size=self.preprocess.crop_size, spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)

    def images(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The batch's ok images in order, and their count; files that no decoder takes become errors.

        The tensor always has batch_size rows (zeros past the ok ones), so every model call has the
        same shape: cudnn tunes once, and a compiled model stays valid.
        """
        gpu_decoded, host_decoded = [], []  # (position, image)
        if batch.decoded_at:
            host_decoded += zip(batch.decoded_at, batch.images.to(self.device, non_blocking=True), strict=True)
        jpegs = batch.jpegs()
        for position, data, image in zip(batch.encoded_at, jpegs, self._decode_all(jpegs), strict=True):
            if image is not None:
                gpu_decoded.append((position, image))
                continue
            try:  # nvJPEG refused it: Pillow decides, as on the CPU path
                host_decoded.append((position, decode_bytes(data.numpy().tobytes(), self.preprocess).to(self.device)))
            except Exception as error:
                batch.errors[position] = describe_error(error)
        row_of = {position: row for row, position in enumerate(i for i, e in enumerate(batch.errors) if e is None)}
        size = self.preprocess.crop_size
        rows = torch.zeros((max(self.batch_size, len(batch.errors)), 3, size, size), dtype=self.dtype,
                           device=self.device)
        for group, pixels in ((gpu_decoded, self.resize), (host_decoded, torch.stack)):
            if group:
                at = torch.tensor([row_of[position] for position, _ in group]).to(self.device, non_blocking=True)
                rows.index_copy_(0, at, pixels([image for _, image in group]).to(self.dtype))
        return rows, len(row_of)


def decode_ahead(batches: Iterable[Batch], decoder: GpuDecoder, threads: int = 2, depth: int = 3
                 ) -> Iterator[tuple[Batch, torch.Tensor, int]]:
    """Decode batches on `threads` threads, each on its own CUDA stream, up to `depth` batches ahead.

    nvJPEG's host work, the copies and the resizing of one batch then overlap the model's kernels
    on another. Results come back in input order; errors are raised here; closing this generator
    waits for the threads.
    """
    streams = threading.local()

    def decode(batch: Batch) -> tuple[Batch, torch.Tensor, int, torch.cuda.Event]:
        if not hasattr(streams, "stream"):
            torch.cuda.set_device(decoder.device)  # a new thread starts on GPU 0, whatever the main thread uses
            streams.stream = torch.cuda.Stream(decoder.device)
        with torch.cuda.stream(streams.stream):
            rows, count = decoder.images(batch)
            done = torch.cuda.Event()
            done.record(streams.stream)
        return batch, rows, count, done

    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpu-decode") as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(decode, batch))
                if len(pending) > depth:
                    yield _on_current_stream(decoder.device, *pending.popleft().result())
            while pending:
                yield _on_current_stream(decoder.device, *pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


def _on_current_stream(device: torch.device, batch: Batch, rows: torch.Tensor, count: int, done: torch.cuda.Event):
    """Make the model's stream wait for the decoding stream, and keep rows' memory until it is used."""
    current = torch.cuda.current_stream(device)
    current.wait_event(done)
    rows.record_stream(current)
    return batch, rows, count
