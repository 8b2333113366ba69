"""Decode a batch's JPEG bytes on the GPU (nvJPEG through torchvision), then resize and crop them there.

The one place that knows the GPU decoder: torchvision marks its decoders deprecated in favour of
TorchCodec from 0.29 on, so swapping the library means changing this module only.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from pipeline.decode import Batch, Preprocess, decode_bytes, describe_error

_logger = logging.getLogger(__name__)


class GpuDecoder:
    """Turns a Batch into one uint8 NCHW tensor on the device, padded to a fixed batch size."""

    def __init__(self, device: torch.device, preprocess: Preprocess, batch_size: int):
        self.device = device
        self.preprocess = preprocess
        self.batch_size = batch_size

    def _decode_all(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """nvJPEG in one call; if it rejects the batch, file by file, so one bad file fails alone."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision 0.29's deprecation notice
            try:
                return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                return [self._decode_one(data) for data in encoded]

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        """Shorter side to resize_size (antialiased), then the center crop: the CPU path's steps."""
        p = self.preprocess
        image = F.resize(image, [p.resize_size], p.interpolation, antialias=p.antialias)
        return F.center_crop(image, [p.crop_size])

    def images(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The batch's ok images, in order, on the device, and their count; files no decoder takes
        become errors.

        The tensor has batch_size rows (zeros past the ok images), so every model call has the
        same shape: cudnn tunes once, and a compiled model or CUDA graph stays valid.
        """
        size = self.preprocess.crop_size
        rows = torch.zeros((max(self.batch_size, len(batch.errors)), 3, size, size), dtype=torch.uint8,
                           device=self.device)
        placed: dict[int, torch.Tensor] = {}
        if len(batch.decoded_at):
            on_device = batch.images.to(self.device, non_blocking=True)
            placed.update(zip(batch.decoded_at, on_device, strict=True))
        for position, data, image in zip(batch.encoded_at, batch.encoded, self._decode_all(batch.encoded),
                                         strict=True):
            if image is None:  # nvJPEG refused it: Pillow decides, as it would on the CPU path
                try:
                    image = decode_bytes(data.numpy().tobytes(), self.preprocess).to(self.device)
                except Exception as error:
                    batch.errors[position] = describe_error(error)
                    continue
            else:
                image = self._fit(image)
            placed[position] = image
        ok = [placed[i] for i, error in enumerate(batch.errors) if error is None]
        if ok:
            torch.stack(ok, out=rows[: len(ok)])
        return rows, len(ok)
