"""Read and decode image files into uint8 tensors in DataLoader workers; a failure is data, not a crash."""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline import causes, stop
from pipeline.causes import Unusable
from pipeline.config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.parquet import DELETED
from pipeline.plan import Plan
from pipeline.read import failure, open_file, open_image, pixel_limit

_logger = logging.getLogger(__name__)

GPU_MAX_PIXELS = 24_000_000  # larger JPEGs go to Pillow in the workers (nvJPEG's memory and time per image)
GPU_MAX_SCANS = 64  # a progressive JPEG of more scans goes to Pillow in a worker, where --decode-timeout applies
#   (encoders write about 10; thousands of repeated scans make a small file decode for minutes)
ORIENTATION_TAG = 0x0112  # EXIF orientation; nvJPEG ignores it, so rotated files go to Pillow
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white before classification
MAX_ASPECT = 16  # a longer side beyond 16x the shorter is cut to its centre first: the crop never sees it
PREFETCH = 4  # batches each worker decodes ahead


@dataclass(frozen=True)
class Preprocess:
    """Resize and crop sizes, read off the weights' own transforms so both always agree."""

    resize_size: int
    crop_size: int
    interpolation: InterpolationMode
    antialias: bool

    @classmethod
    def from_transforms(cls, transforms) -> Preprocess:
        return cls(
            resize_size=transforms.resize_size[0],
            crop_size=transforms.crop_size[0],
            interpolation=transforms.interpolation,
            antialias=bool(transforms.antialias),
        )


def decode_stream(file: BinaryIO, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  draft: bool = False) -> torch.Tensor:
    """One encoded image as a uint8 CHW tensor (EXIF orientation, RGB, resize, center crop), or Unusable.

    Without draft (the default) the pixels are the weights' own transforms applied to the decoded image. With
    draft (--jpeg-draft), a large JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale that keeps both
    sides at least the resize size, so the resize that follows still only shrinks.
    """
    with pixel_limit(max_pixels):
        try:
            image = open_image(file)
            if draft:
                image.draft(None, (preprocess.resize_size, preprocess.resize_size))
            ImageOps.exif_transpose(image, in_place=True)  # decodes the pixels; no copy without an orientation
        except Unusable:
            raise
        except Exception as error:
            raise failure(error, max_pixels) from error
        image = to_rgb(_limit_aspect(image))
    image = F.resize(image, [preprocess.resize_size], preprocess.interpolation, antialias=preprocess.antialias)
    image = F.center_crop(image, [preprocess.crop_size])
    return F.pil_to_tensor(image)


def decode_bytes(data: bytes, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft: bool = False) -> torch.Tensor:
    return decode_stream(io.BytesIO(data), preprocess, max_pixels, draft)


def decode_file(path: Path, preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                draft: bool = False) -> torch.Tensor:
    with open_file(path) as file:
        return decode_stream(file, preprocess, max_pixels, draft)


def gpu_jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """The (height, width) of a JPEG nvJPEG can take as is (RGB or grey, upright, complete, not huge, not a pile of
    scans), which lets the GPU decoder bound its memory; None for anything else (other formats, CMYK, EXIF-rotated,
    truncated, over GPU_MAX_PIXELS or GPU_MAX_SCANS), decoded by Pillow in the worker with the same checks."""
    if not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9") or data.count(b"\xff\xda") > GPU_MAX_SCANS:
        return None  # 0xFFDA starts a scan: entropy-coded data never holds it (an 0xFF there is followed by 0x00)
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        if (image.mode in ("RGB", "L") and image.width * image.height <= GPU_MAX_PIXELS
                and image.getexif().get(ORIENTATION_TAG, 1) == 1):
            return image.height, image.width
        return None


def describe_error(error: Exception) -> str:
    """The error column's text for a file that could not be decoded: '<cause>: <detail>' (pipeline/causes.py)."""
    return causes.error_text(error)


def _limit_aspect(image: Image.Image) -> Image.Image:
    """The centre of an image whose longer side exceeds MAX_ASPECT times the shorter: all the center crop sees."""
    width, height = image.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return image
    if width > height:
        left = (width - MAX_ASPECT * height) // 2
        return image.crop((left, 0, left + MAX_ASPECT * height, height))
    top = (height - MAX_ASPECT * width) // 2
    return image.crop((0, top, width, top + MAX_ASPECT * width))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: 16/32-bit and float gray scaled to 8 bits, transparency composited onto BACKGROUND."""
    if image.mode.startswith("I"):  # I;16, I;16B, ... and I: 0..65535 maps onto 0..255, rounded
        pixels = np.asarray(image).clip(0, 65535).astype(np.uint32)  # in place from here: memory stays bounded
        pixels *= 255
        pixels += 32767
        pixels //= 65535
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    elif image.mode == "F":  # floats have no fixed range: the image's own min..max maps onto 0..255
        pixels = np.nan_to_num(np.array(image, dtype=np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = pixels.min(), pixels.max()
        pixels -= low
        pixels *= np.float32(255 / (high - low) if high > low else 0)
        image = Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8), mode="L")
    if image.mode == "La":  # premultiplied (a TIFF can say so): Pillow converts it to nothing but LA
        image = image.convert("LA")
    try:
        if image.has_transparency_data:
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            rgb = Image.new("RGB", image.size, BACKGROUND)
            rgb.paste(rgba, (0, 0), rgba)  # its alpha as the mask
            return rgb
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as error:
        raise Unusable(causes.MODE, f"{image.mode} ({error})") from None


@dataclass
class Sample:
    """One work item as a worker hands it over: decoded pixels, JPEG bytes for the GPU, or an error."""

    index: int
    image: torch.Tensor | None = None  # uint8 CHW, decoded by the worker
    encoded: bytes | None = None  # a JPEG file left to the GPU decoder
    encoded_shape: tuple[int, int] | None = None  # its (height, width), from its header
    error: str | None = None


@dataclass
class Batch:
    """A run of consecutive work items; each item is decoded, encoded (for the GPU) or an error."""

    indices: torch.Tensor  # int64 [n]: plan indices, in order
    errors: list[str | None]  # [n]: None for an item that is (or will be) decoded
    images: torch.Tensor  # uint8 [n_decoded, 3, H, W]: items decoded by the workers
    decoded_at: list[int]  # their positions in the batch
    encoded: torch.Tensor  # uint8 [total bytes]: the JPEG files left to the GPU decoder, end to end
    encoded_sizes: list[int]  # each file's length in encoded (one tensor crosses processes, not 256)
    encoded_shapes: list[tuple[int, int] | None]  # each file's (height, width) from its header, None if unknown:
    #   the GPU decoder bounds its memory by decoded pixels before decoding
    encoded_at: list[int]  # their positions in the batch

    def jpegs(self) -> list[torch.Tensor]:
        """One uint8 view per JPEG file left to the GPU decoder."""
        return list(torch.split(self.encoded, self.encoded_sizes)) if self.encoded_sizes else []

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread, so copies to the GPU can be asynchronous.

        The JPEG bytes are pinned too: nvJPEG copies each file to the device inside torchvision's
        decode call, which holds a process-wide lock; from pageable memory each copy is staged on the
        host first. On an H100 that gave about 8 % more steady throughput for about 1 GiB more main-process
        memory, the pinned bytes of the batches in flight (docs/benchmarks.md).
        """
        return dataclasses.replace(self, images=self.images.pin_memory(), encoded=self.encoded.pin_memory())


class ImageFiles(Dataset):
    """The items of a plan, by position in `indices`; each becomes one Sample."""

    def __init__(self, source, plan: Plan, indices: list[int], preprocess: Preprocess,
                 gpu_jpeg: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_bytes: int = DEFAULT_MAX_FILE_BYTES, draft: bool = False, batch_size: int = 1):
        self.source = source  # lists and opens the items (pipeline.source, pipeline.remote)
        self.paths = plan.paths  # Arrow: shared by forked workers without copy-on-write growth
        self.indices = indices
        self.preprocess = preprocess
        self.gpu_jpeg = gpu_jpeg  # hand plain JPEGs over undecoded, for the GPU
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes  # larger files are refused before a byte is read
        self.draft = draft  # Pillow's reduced-scale JPEG decoding (--jpeg-draft)
        self.batch_size = batch_size  # a worker reads a whole batch: what it may fetch ahead (a remote source)
        self.fetch_ahead = getattr(source, "fetch_ahead", None)
        self.deleted_from = plan.deleted_from  # items from here on are deletions: a row, never a read

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, position: int) -> str:
        """The item's path, for a log line."""
        return self.paths[self.indices[position]].as_py()

    def __getitem__(self, position: int) -> Sample:
        index = self.indices[position]
        if index >= self.deleted_from:
            return Sample(index, error=DELETED)
        if self.fetch_ahead is not None:  # an object store: the next items of this batch are fetched meanwhile
            end = min(len(self.indices), (position // self.batch_size + 1) * self.batch_size,
                      position + 1 + self.source.fetch_threads)
            self.fetch_ahead([self.paths[self.indices[p]].as_py() for p in range(position + 1, end)
                              if self.indices[p] < self.deleted_from], self.max_bytes)
        try:
            with self.source.open(self.paths[index].as_py(), self.max_bytes) as file:
                if not self.gpu_jpeg:
                    return Sample(index, image=decode_stream(file, self.preprocess, self.max_pixels, self.draft))
                data = file.read(self.max_bytes + 1)  # a file that grew since it was opened is read no further
            if len(data) > self.max_bytes:
                raise Unusable(causes.TOO_LARGE, f"it grew past the limit {self.max_bytes} while read")
            shape = self._for_the_gpu(data)
            if shape is not None:
                return Sample(index, encoded=data, encoded_shape=shape)
            return Sample(index, image=decode_bytes(data, self.preprocess, self.max_pixels, self.draft))
        except Exception as error:  # any failure of one file is that file's error row
            return Sample(index, error=describe_error(error))

    def _for_the_gpu(self, data: bytes) -> tuple[int, int] | None:
        """gpu_jpeg_shape within the pixel limit; any doubt goes to Pillow (None), which names the cause."""
        try:
            with pixel_limit(self.max_pixels):
                return gpu_jpeg_shape(data)
        except Exception:
            return None


def collate(samples: list[Sample]) -> Batch:
    decoded_at = [i for i, sample in enumerate(samples) if sample.image is not None]
    encoded_at = [i for i, sample in enumerate(samples) if sample.encoded is not None]
    jpegs = b"".join(samples[i].encoded for i in encoded_at)
    return Batch(
        indices=torch.tensor([sample.index for sample in samples], dtype=torch.int64),
        errors=[sample.error for sample in samples],
        images=torch.stack([samples[i].image for i in decoded_at]) if decoded_at else torch.empty(
            (0, 3, 0, 0), dtype=torch.uint8),
        decoded_at=decoded_at,
        encoded=torch.frombuffer(bytearray(jpegs), dtype=torch.uint8) if jpegs else torch.empty(0, dtype=torch.uint8),
        encoded_sizes=[len(samples[i].encoded) for i in encoded_at],
        encoded_shapes=[samples[i].encoded_shape for i in encoded_at],
        encoded_at=encoded_at,
    )


def join(batches: list[Batch]) -> Batch:
    """Consecutive batches as one (the guard regroups items it decoded one at a time)."""
    starts = np.cumsum([0] + [len(batch.errors) for batch in batches[:-1]]).tolist()
    images = [batch.images for batch in batches if len(batch.images)]
    encoded = [batch.encoded for batch in batches if len(batch.encoded)]
    return Batch(
        indices=torch.cat([batch.indices for batch in batches]),
        errors=[error for batch in batches for error in batch.errors],
        images=torch.cat(images) if images else torch.empty((0, 3, 0, 0), dtype=torch.uint8),
        decoded_at=[start + i for batch, start in zip(batches, starts, strict=True) for i in batch.decoded_at],
        encoded=torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8),
        encoded_sizes=[size for batch in batches for size in batch.encoded_sizes],
        encoded_shapes=[shape for batch in batches for shape in batch.encoded_shapes],
        encoded_at=[start + i for batch, start in zip(batches, starts, strict=True) for i in batch.encoded_at],
    )


def _quiet_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode with Pillow; torch threads would only contend
    stop.ignore_in_worker()  # a process-group signal is the main process's to handle


def make_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool,
                prefetch: int = PREFETCH, timeout: float = 0) -> DataLoader:
    """Batches in plan order (no shuffling), pinned for asynchronous copies to the device. timeout: waiting longer
    than this for a batch raises RuntimeError('DataLoader timed out ...'), after which the wait may go on."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if workers else None,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
        timeout=timeout if workers else 0,
    )
