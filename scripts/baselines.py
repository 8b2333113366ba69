#!/usr/bin/env python3
"""The two recipes issue 5 compares the job with, each a whole process from start to saved logits.

    python scripts/baselines.py plain CORPUS OUT.npy   # PIL + weights.transforms() in workers, fp32 ResNet18
    python scripts/baselines.py timm CORPUS OUT.npy    # timm's loader (GPU-side normalise), AMP, channels_last

`plain` is the DataLoader recipe of torchvision's docs. `timm` uses timm's own data pipeline and
model factory with --amp --channels-last, as its inference.py does (that script is not shipped in
the wheel, so this is its recipe through the library's API, not the script itself).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.models import ResNet18_Weights, resnet18

_logger = logging.getLogger("baselines")


class Files(Dataset):
    def __init__(self, root: Path, transform):
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), 0


def plain(root: Path, workers: int, batch_size: int) -> np.ndarray:
    loader = DataLoader(Files(root, ResNet18_Weights.IMAGENET1K_V1.transforms()), batch_size=batch_size,
                        num_workers=workers, pin_memory=True)
    model = resnet18().cuda().eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            out.append(model(x.cuda(non_blocking=True)).cpu().numpy())
    return np.concatenate(out)


def timm_recipe(root: Path, workers: int, batch_size: int) -> np.ndarray:
    import timm
    from timm.data import create_loader, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False).cuda().eval().to(memory_format=torch.channels_last)
    config = resolve_data_config({}, model=model)  # create_loader sets the dataset's transform itself
    loader = create_loader(Files(root, None), input_size=config["input_size"], batch_size=batch_size,
                           use_prefetcher=True, interpolation=config["interpolation"], mean=config["mean"],
                           std=config["std"], num_workers=workers, crop_pct=config["crop_pct"])
    out = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for x, _ in loader:
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=["plain", "timm"])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("baselines.py needs CUDA: both recipes run the model on a GPU")
    started = time.monotonic()
    logits = (plain if args.recipe == "plain" else timm_recipe)(args.corpus, args.workers, args.batch_size)
    np.save(args.out, logits)
    _logger.info("%s: %d images in %.1f s", args.recipe, len(logits), time.monotonic() - started)


if __name__ == "__main__":
    main()
