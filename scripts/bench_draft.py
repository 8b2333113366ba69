"""How much reduced-scale JPEG decoding (Pillow's draft) saves on a big photo, and how close its logits stay.

    python scripts/bench_draft.py [--size 8000x6000] [--repeat 5]

Decodes one synthetic JPEG with the job's own decode_file, with and without draft, and prints the
best time of each, the speed-up, and the cosine similarity of ResNet18 logits (seeded random weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models import resnet18

from pipeline.decode import Preprocess, decode_file
from pipeline.model import preprocessing_transforms


def synthetic_photo(path: Path, width: int, height: int, seed: int = 0) -> None:
    """Coarse random structure scaled up, plus fine grain, saved at quality 90."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.integers(-12, 13, pixels.shape, dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def best_time(path: Path, preprocess: Preprocess, draft: bool, repeat: int) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        image = decode_file(path, preprocess, draft=draft)
        times.append(time.perf_counter() - started)
    return min(times), image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8000x6000", help="WIDTHxHEIGHT of the synthetic JPEG")
    parser.add_argument("--repeat", type=int, default=5, help="decodes of each kind; the best time counts")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    transforms = preprocessing_transforms()
    preprocess = Preprocess.from_transforms(transforms)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.jpg"
        synthetic_photo(path, width, height)
        size_mb = path.stat().st_size / 1e6
        full_s, full = best_time(path, preprocess, draft=False, repeat=args.repeat)
        draft_s, drafted = best_time(path, preprocess, draft=True, repeat=args.repeat)
    torch.manual_seed(0)
    model = resnet18().eval()
    mean = torch.tensor(transforms.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(transforms.std).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        logits = model((torch.stack([full, drafted]).float() - mean) / std)
    cosine = torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0).item()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}, "
          f"Pillow {Image.__version__}, torch {torch.__version__}")
    print(f"JPEG {width}x{height} ({size_mb:.1f} MB), best of {args.repeat}, decode + resize + crop to 224:")
    print(f"  full decode: {full_s * 1000:.0f} ms   draft: {draft_s * 1000:.0f} ms   speed-up: {full_s / draft_s:.1f}x")
    print(f"  logits cosine similarity (draft vs full): {cosine:.6f}")


if __name__ == "__main__":
    main()
