"""Read and decode image files into uint8 tensors in DataLoader workers; a failure is data, not a crash."""

from __future__ import annotations

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


def decode_file(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """One image file as a uint8 CHW tensor: EXIF orientation, RGB, resize, center crop."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    image = F.resize(image, [preprocess.resize_size], preprocess.interpolation, antialias=preprocess.antialias)
    image = F.center_crop(image, [preprocess.crop_size])
    return F.pil_to_tensor(image)


def describe_error(error: Exception) -> str:
    """The error column's text for a file that could not be decoded."""
    return f"{type(error).__name__}: {error}"


@dataclass
class Batch:
    """A fixed run of consecutive work items: decoded images for the ok ones, messages for the rest."""

    indices: torch.Tensor  # int64 [n]: plan indices, in order
    images: torch.Tensor  # uint8 [n_ok, 3, H, W]: the items whose error is None, in order
    errors: list[str | None]  # [n]: None for a decoded item

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread, so the copy to the GPU can be asynchronous."""
        return Batch(self.indices, self.images.pin_memory(), self.errors)


class ImageFiles(Dataset):
    """The items of a plan, by position in `indices`; each decodes to (index, image or None, error)."""

    def __init__(self, input_dir: Path, plan: Plan, indices: list[int], preprocess: Preprocess):
        self.input_dir = input_dir
        self.paths = plan.paths  # Arrow: shared by forked workers without copy-on-write growth
        self.indices = indices
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        index = self.indices[position]
        path = self.input_dir / self.paths[index].as_py()
        try:
            return index, decode_file(path, self.preprocess), None
        except Exception as error:  # any failure of one file is that file's error row
            return index, None, describe_error(error)


def collate(samples: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    indices = torch.tensor([index for index, _, _ in samples], dtype=torch.int64)
    images = [image for _, image, _ in samples if image is not None]
    stacked = torch.stack(images) if images else torch.empty((0, 3, 0, 0), dtype=torch.uint8)
    return Batch(indices=indices, images=stacked, errors=[error for _, _, error in samples])


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
