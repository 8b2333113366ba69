"""Read and decode image files into uint8 tensors in DataLoader workers; a failure is data, not a crash."""

from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline.plan import Plan

_logger = logging.getLogger(__name__)

GPU_MAX_PIXELS = 24_000_000  # larger JPEGs are cheaper in Pillow's reduced-scale (draft) decode
ORIENTATION_TAG = 0x0112  # EXIF orientation; nvJPEG ignores it, so rotated files go to Pillow


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


def decode_bytes(data: bytes, preprocess: Preprocess) -> torch.Tensor:
    """One encoded image as a uint8 CHW tensor: EXIF orientation, RGB, resize, center crop."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    image = F.resize(image, [preprocess.resize_size], preprocess.interpolation, antialias=preprocess.antialias)
    image = F.center_crop(image, [preprocess.crop_size])
    return F.pil_to_tensor(image)


def decode_file(path: Path, preprocess: Preprocess) -> torch.Tensor:
    return decode_bytes(path.read_bytes(), preprocess)


def gpu_decodable(data: bytes) -> bool:
    """A baseline-or-progressive JPEG nvJPEG can take as is: RGB or grey, upright, complete, not huge.

    Everything else (other formats, CMYK, EXIF-rotated, truncated, over GPU_MAX_PIXELS) is decoded
    by Pillow in the worker, so every path meets the same checks and gives the same errors.
    """
    if not (data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9"):
        return False
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return (image.mode in ("RGB", "L") and image.width * image.height <= GPU_MAX_PIXELS
                and image.getexif().get(ORIENTATION_TAG, 1) == 1)


def describe_error(error: Exception) -> str:
    """The error column's text for a file that could not be decoded."""
    return f"{type(error).__name__}: {error}"


@dataclass
class Sample:
    """One work item as a worker hands it over: decoded pixels, JPEG bytes for the GPU, or an error."""

    index: int
    image: torch.Tensor | None = None  # uint8 CHW, decoded by the worker
    encoded: bytes | None = None  # a JPEG file left to the GPU decoder
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
    encoded_at: list[int]  # their positions in the batch

    def jpegs(self) -> list[torch.Tensor]:
        """One uint8 view per JPEG file left to the GPU decoder."""
        return list(torch.split(self.encoded, self.encoded_sizes)) if self.encoded_sizes else []

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread, so copies to the GPU can be asynchronous.

        The JPEG bytes stay unpinned: nvJPEG parses them on the host, and pinning them cost the
        GIL a sixth of its time on the GPU box (py-spy) for no measurable decoding gain.
        """
        return dataclasses.replace(self, images=self.images.pin_memory())


class ImageFiles(Dataset):
    """The items of a plan, by position in `indices`; each becomes one Sample."""

    def __init__(self, input_dir: Path, plan: Plan, indices: list[int], preprocess: Preprocess,
                 gpu_jpeg: bool = False):
        self.input_dir = input_dir
        self.paths = plan.paths  # Arrow: shared by forked workers without copy-on-write growth
        self.indices = indices
        self.preprocess = preprocess
        self.gpu_jpeg = gpu_jpeg  # hand plain JPEGs over undecoded, for the GPU

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Sample:
        index = self.indices[position]
        path = self.input_dir / self.paths[index].as_py()
        try:
            data = path.read_bytes()
            if self.gpu_jpeg and gpu_decodable(data):
                return Sample(index, encoded=data)
            return Sample(index, image=decode_bytes(data, self.preprocess))
        except Exception as error:  # any failure of one file is that file's error row
            return Sample(index, error=describe_error(error))


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
        encoded_at=encoded_at,
    )


def _quiet_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode with Pillow; torch threads would only contend


def make_loader(dataset: ImageFiles, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in plan order (no shuffling), pinned for asynchronous copies to the device."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
