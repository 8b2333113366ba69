"""Inputs that need no downloads: smooth random pictures, a nested corpus of them, ResNet18 weights with
non-trivial BatchNorm statistics, and non-trivial random weights of any torchvision classifier.

Used by scripts/soak.py, bench.py, bench_cpu.py and gpu_integrity.py (as a sibling module), and by the tests
through tests/conftest.py (as scripts.synthetic); it imports nothing from scripts/, so it loads either way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models import get_model, resnet18


def write_image(path: Path, seed: int, size: tuple[int, int] = (96, 72), mode: str = "RGB", **save) -> Path:
    """A smooth random picture (noise plus gradients, so resizing matters) saved in the format of its suffix."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3) + 60 * np.sin(xx[..., None] / rng.uniform(3, 12)) + 60 * np.cos(yy[..., None] / 7)
    pixels = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, **save)
    return path


def make_corpus(root: Path, count: int, formats=("jpg", "png", "webp"), size=(96, 72)) -> list[str]:
    """count images in nested folders, formats round-robin; returns their relative paths, sorted."""
    paths = []
    for i in range(count):
        relative = f"d{i % 3}/sub{i % 2}/img{i:04d}.{formats[i % len(formats)]}"
        write_image(root / relative, seed=i, size=(size[0] + i % 7, size[1] + i % 5))
        paths.append(relative)
    return sorted(paths)


def seeded_state_dict(seed: int = 0, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """ResNet18 weights with random, non-trivial BatchNorm statistics, so preprocessing errors show."""
    torch.manual_seed(seed)
    model = resnet18(weights=None, num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    return model.state_dict()


def nontrivial_state_dict(architecture: str, seed: int = 0, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """Random weights of a torchvision classifier whose logits differ by units, not by 1e-10 (some architectures
    start near zero): normalisation statistics and linear layers drawn anew, so preprocessing errors show."""
    torch.manual_seed(seed)
    net = get_model(architecture, weights=None, num_classes=num_classes)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
    return net.state_dict()
