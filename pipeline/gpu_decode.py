"""Decode a batch's JPEG bytes on the GPU (nvJPEG through torchvision), resize and crop them there.

The one place that knows the GPU decoder: torchvision marks its decoders deprecated in favour of
TorchCodec from 0.29 on, so swapping the library means changing this module only.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from pipeline.decode import GPU_MAX_PIXELS, Batch, Preprocess, decode_bytes, describe_error

_logger = logging.getLogger(__name__)

DECODE_PIXELS = 128_000_000  # decoded pixels per nvJPEG call (384 MB of RGB): a batch of 256 photos of up to
#   0.5 MP stays one call, which is what makes nvJPEG fast; 256 photos of 12 MP (9 GB) about 25 calls
GROUPS_ALIVE = 2  # decoded groups a decode thread holds at once: one resized while the next decodes (one alone:
#   2-12 MP photos went 1,384 -> 749 img/s steady on an H200, docs/benchmarks.md)
RESIZE_CHUNK = 32  # images padded together for one roi_align call (32 beat 64, 128 and 256 on an H100)
RESIZE_PIXELS = 32_000_000  # padded pixels per roi_align call (384 MB of float32 RGB): 32 images of up to
#   1000 x 1000, but two of 12 MP, not 32 padded to 4.6 GB


class GpuDecoder:
    """Turns a Batch into one float NCHW tensor of 0..255 pixels on the device, of fixed batch size."""

    threads = 2  # decode_ahead's threads: torchvision's lock lets a second one overlap one batch's decoding
    #   with another's resizing; a third did not pay, nor did TorchCodec's lock-free decoder on 2-6 threads
    #   (docs/benchmarks.md)

    def __init__(self, device: torch.device, preprocess: Preprocess, batch_size: int, dtype: torch.dtype):
        if device.type == "cuda" and device.index is None:  # threads set it as their current device: pin it
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float32  # bf16 rounds 0..255
        self._per_thread = threading.local()  # each decode thread's stream for nvJPEG's images (_nvjpeg)

    def warm_up(self) -> None:
        """Start nvJPEG (its handle, the hardware decoder's state) on a tiny JPEG, before real batches need it."""
        with io.BytesIO() as tiny:
            Image.new("RGB", (16, 16)).save(tiny, "JPEG")
            data = torch.frombuffer(bytearray(tiny.getvalue()), dtype=torch.uint8)
        torch.cuda.set_device(self.device)
        started = time.monotonic()
        self._decode_all([data])
        _logger.debug("nvJPEG started in %.2f s", time.monotonic() - started)

    def _decode_all(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG in one call; if it rejects the batch, file by file, so one bad file fails alone."""
        if not jpegs:
            return []
        try:
            return self._nvjpeg(jpegs)
        except RuntimeError:
            return [self._decode_one(data) for data in jpegs]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._nvjpeg([data])[0]
        except RuntimeError:
            return None

    def _nvjpeg(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        """torchvision's decode, its images safe to read on the calling thread's current stream.

        torchvision allocates the images on the caller's current stream but writes them from a stream
        of its own that does not wait for the caller's. On a decode thread's stream it could be handed
        memory that the stream's queued kernels (the last batch's resize) have yet to read, and
        overwrite it first: wrong pixels, no error. So the images are allocated on a stream of their
        own that runs nothing, the caller's stream waits for them, and record_stream keeps their memory
        from being handed out again before the caller's kernels have read them.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29's deprecation notice
            if self.device.type != "cuda":  # the GPU path's code on the CPU, for tests
                return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
            reader = torch.cuda.current_stream(self.device)
            if not hasattr(self._per_thread, "images"):
                self._per_thread.images = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._per_thread.images):
                images = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        reader.wait_stream(self._per_thread.images)
        for image in images:
            image.record_stream(reader)
        return images

    def crop_boxes(self, sizes: np.ndarray) -> np.ndarray:
        """The center crop of each resized image, in its source image's coordinates: [x1, y1, x2, y2] per row.

        sizes is [n, 2] (height, width). Vectorised form of the weights' Resize (shorter side to
        resize_size, the longer one truncated as torchvision does) followed by CenterCrop.
        """
        p = self.preprocess
        height, width = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
        short, long = np.minimum(height, width), np.maximum(height, width)
        new_long = (p.resize_size * long / short).astype(np.int64)  # int() of torchvision's
        #   _compute_resized_output_size: truncation of a positive float
        portrait = height > width
        resized_h = np.where(portrait, new_long, p.resize_size)
        resized_w = np.where(portrait, p.resize_size, new_long)
        top = np.round((resized_h - p.crop_size) / 2.0)  # half to even, as Python's round() in CenterCrop
        left = np.round((resized_w - p.crop_size) / 2.0)
        sy, sx = resized_h / height, resized_w / width
        return np.stack([left / sx, top / sy, (left + p.crop_size) / sx, (top + p.crop_size) / sy], axis=1)

    def resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Resize-then-center-crop of every image, in order: [n, 3, crop, crop] of the decoder's dtype."""
        size = self.preprocess.crop_size
        out = torch.empty((len(images), 3, size, size), dtype=self.dtype, device=self.device)
        self.resize_into(out, np.arange(len(images)), images)
        return out

    def resize_into(self, out: torch.Tensor, rows: np.ndarray, images: list[torch.Tensor]) -> None:
        """Resize-then-center-crop images[i] into out[rows[i]], a few roi_align calls per batch (area
        sampling antialiases); agrees with Pillow's antialiased bilinear resize to a logit cosine of 0.9999.

        Images are padded to a common size per chunk of similar sizes (resize_chunks), bounding the padding
        memory; an image's row does not depend on the others in its chunk. No Python runs per image beyond
        reading its shape: the padding is two nested-tensor calls, and the batch's row numbers and boxes cross
        to the device in two copies.
        """
        sizes = np.array([image.shape[1:] for image in images], dtype=np.int64).reshape(-1, 2)
        order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
        boxes = self.crop_boxes(sizes[order])
        chunks = resize_chunks(sizes[order], boxes)
        in_chunk = np.concatenate([np.arange(end - start) for start, end in chunks] or [[]])  # roi_align's image index
        rois = np.concatenate([in_chunk[:, None], boxes], axis=1).astype(np.float32)
        rois_on_device, rows_on_device = self._on_device(rois), self._on_device(rows[order])
        for start, end in chunks:
            chunk = order[start:end]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "nested tensors are a prototype"
                nested = torch.nested.nested_tensor([images[i] for i in chunk]).to(torch.float32)
                padded = torch.nested.to_padded_tensor(nested, 0.0)  # float32 pads in one kernel, uint8 image
                #   by image; float32 also because in half precision, roi_align's sample positions past
                #   pixel 512 would round to half a pixel
            pixels = roi_align(padded, rois_on_device[start:end],
                               output_size=self.preprocess.crop_size, spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True)
            out.index_copy_(0, rows_on_device[start:end], pixels.to(out.dtype))

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        """A small host array on the device, without waiting: a copy from pageable memory would block
        this thread until its stream's earlier work (the resizing) is done; from pinned memory it is queued."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def images(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The batch's ok images in order, and their count; files that no decoder takes become errors.

        The tensor always has batch_size rows (zeros past the ok ones), so every model call has the
        same shape. The JPEGs are decoded a group at a time (decode_groups), each resized into its rows
        before the next is decoded.
        """
        size = self.preprocess.crop_size
        rows = torch.zeros((max(self.batch_size, len(batch.errors)), 3, size, size), dtype=self.dtype,
                           device=self.device)
        host_decoded = []  # (position, image): the workers' images and Pillow's, placed once every error is known
        if batch.decoded_at:
            host_decoded += zip(batch.decoded_at, batch.images.to(self.device, non_blocking=True), strict=True)
        jpegs = batch.jpegs()
        resized: deque[torch.cuda.Event] = deque()  # each group's resize, queued on this thread's stream
        for group in decode_groups(batch.encoded_shapes):
            if len(resized) == GROUPS_ALIVE:  # a group's images return to the pool only once their resize ran
                resized.popleft().synchronize()  # (record_stream): wait for the oldest, so that at most
                #   GROUPS_ALIVE groups hold memory, one decoding while the one before it is resized
            self._decode_group(batch, group, jpegs, rows, host_decoded)
            if self.device.type == "cuda":
                resized.append(torch.cuda.Event())
                resized[-1].record(torch.cuda.current_stream(self.device))
        ok = np.array([error is None for error in batch.errors], dtype=bool)
        if host_decoded:
            at = self._on_device(_row_numbers(ok)[[position for position, _ in host_decoded]])
            rows.index_copy_(0, at, torch.stack([image for _, image in host_decoded]).to(self.dtype))
        return rows, int(ok.sum())

    def _decode_group(self, batch: Batch, group: slice, jpegs: list[torch.Tensor], rows: torch.Tensor,
                      host_decoded: list[tuple[int, torch.Tensor]]) -> None:
        """Decode one group of the batch's JPEGs and resize them into their rows; what nvJPEG refuses goes to
        Pillow (into host_decoded) or becomes the file's error."""
        gpu_decoded = []  # (position, image)
        for position, data, image in zip(batch.encoded_at[group], jpegs[group], self._decode_all(jpegs[group]),
                                         strict=True):
            if image is not None:
                gpu_decoded.append((position, image))
                continue
            try:  # nvJPEG refused it: Pillow decides, as on the CPU path
                host_decoded.append((position, decode_bytes(data.numpy().tobytes(), self.preprocess).to(self.device)))
            except Exception as error:
                batch.errors[position] = describe_error(error)
        if gpu_decoded:  # the errors of every position up to this group's are known: later groups lie after it
            row_of = _row_numbers(np.array([error is None for error in batch.errors], dtype=bool))
            self.resize_into(rows, row_of[[position for position, _ in gpu_decoded]],
                             [image for _, image in gpu_decoded])


def _row_numbers(ok: np.ndarray) -> np.ndarray:
    """The row of each position of a batch whose ok positions are `ok`: the ok ones before it."""
    return np.cumsum(ok) - 1


def decode_groups(shapes: list[tuple[int, int] | None]) -> list[slice]:
    """Consecutive runs of a batch's JPEGs of at most DECODE_PIXELS decoded pixels each, in order; an image
    over the budget alone. A shape the worker did not read counts as the largest it hands over."""
    ends = np.cumsum([shape[0] * shape[1] if shape else GPU_MAX_PIXELS for shape in shapes], dtype=np.int64)
    groups, start = [], 0
    while start < len(ends):
        before = ends[start - 1] if start else 0
        end = max(start + 1, int(np.searchsorted(ends, before + DECODE_PIXELS, side="right")))
        groups.append(slice(start, end))
        start = end
    return groups


def resize_chunks(sizes: np.ndarray, boxes: np.ndarray) -> list[tuple[int, int]]:
    """Runs [start, end) of images (sizes [n, 2], sorted by area; their crop boxes) padded together for one
    roi_align call: at most RESIZE_CHUNK, of at most RESIZE_PIXELS padded (count x tallest x widest).

    An image whose box ends within half a pixel of its bottom or right side (a side under 8 pixels, for a
    256/224 resize and crop) goes alone: roi_align's last samples there would blend in the padding, not clamp
    to the edge, and its row would depend on its neighbours. Any other image's samples lie inside it, so
    padding never changes a row.
    """
    near_edge = (boxes[:, 2] > sizes[:, 1] - 0.5) | (boxes[:, 3] > sizes[:, 0] - 0.5)
    chunks, start = [], 0
    while start < len(sizes):
        end = min(start + RESIZE_CHUNK, len(sizes))
        padded = (np.arange(1, end - start + 1) * np.maximum.accumulate(sizes[start:end, 0])
                  * np.maximum.accumulate(sizes[start:end, 1]))
        cut = (padded > RESIZE_PIXELS) | near_edge[start:end]
        cut[0] = False  # the first image goes in whatever its size
        length = 1 if near_edge[start] else int(np.argmax(cut)) if cut.any() else end - start
        chunks.append((start, start + length))
        start += length
    return chunks


def decode_ahead(batches: Iterable[Batch], decoder: GpuDecoder, threads: int | None = None
                 ) -> Iterator[tuple[Batch, torch.Tensor, int]]:
    """Decode batches on `threads` threads (the decoder's number), each on its own CUDA stream, one batch
    ahead of them.

    nvJPEG's host work, the copies and the resizing of one batch then overlap the model's kernels
    on another. Results come back in input order; errors are raised here; closing this generator
    waits for the threads.
    """
    threads = threads or decoder.threads
    depth = threads + 1
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
