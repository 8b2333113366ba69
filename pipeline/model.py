"""Find and check the weights, build torchvision's ResNet18 from them, and name its classes."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.hub import get_dir
from torchvision.models import ResNet18_Weights, resnet18

_logger = logging.getLogger(__name__)

IMAGENET = ResNet18_Weights.IMAGENET1K_V1


class WeightsError(Exception):
    """The weights or labels cannot be used; the message names the fix."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, checked before any worker starts or model is built."""

    kind: str  # 'imagenet', 'random' or 'file'
    path: Path | None  # the file for 'imagenet' (torchvision's cache) and 'file'
    sha256: str  # fingerprint of the file; for 'random', of the seed
    seed: int

    def facts(self) -> dict:
        return {"weights": self.kind, "weights_path": str(self.path or ""), "weights_sha256": self.sha256}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def imagenet_cache_path() -> Path:
    """Where torchvision's weights API keeps the ImageNet weights (under TORCH_HOME)."""
    return Path(get_dir()) / "checkpoints" / Path(IMAGENET.url).name


def _fetch_imagenet() -> Path:
    path = imagenet_cache_path()
    if path.exists():
        return path
    try:
        IMAGENET.get_state_dict(progress=False, check_hash=True)  # downloads into the cache
    except Exception as error:
        raise WeightsError(
            f"the ImageNet weights are not in torchvision's cache ({path}) and could not be "
            f"downloaded ({type(error).__name__}: {error}). Fix: on a machine with internet, download "
            f"{IMAGENET.url} to {path} (or set TORCH_HOME to a folder holding checkpoints/{path.name}), "
            "or pass --weights PATH to a ResNet18 state_dict file"
        ) from error
    return path


def resolve_weights(weights: str, seed: int) -> WeightsSource:
    """Check that the weights named on the command line can be had, without building the model."""
    if weights == "random":
        return WeightsSource("random", None, hashlib.sha256(f"random-seed-{seed}".encode()).hexdigest(), seed)
    if weights == "imagenet":
        path = _fetch_imagenet()
        return WeightsSource("imagenet", path, _sha256(path), seed)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file; pass 'imagenet', 'random' or a state_dict file")
    return WeightsSource("file", path.resolve(), _sha256(path), seed)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"--weights {path} cannot be read as a PyTorch file: {error}") from error
    for key in ("state_dict", "model"):  # checkpoints of torchvision's reference scripts
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or "fc.weight" not in loaded:
        raise WeightsError(f"--weights {path} holds no ResNet18 state_dict (no 'fc.weight' key)")
    return loaded


def build_model(source: WeightsSource) -> torch.nn.Module:
    """ResNet18 in eval mode on the CPU, with the class count of its weights."""
    if source.kind == "random":
        torch.manual_seed(source.seed)
        return resnet18(weights=None).eval()
    state = _state_dict(source.path)
    model = resnet18(weights=None, num_classes=state["fc.weight"].shape[0])
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise WeightsError(f"--weights {source.path} does not fit ResNet18: {error}") from error
    return model.eval()


def class_names(num_classes: int, labels: Path | None) -> list[str]:
    """Names from --labels (one per line), else ImageNet's categories from the weights' metadata."""
    if labels is not None:
        names = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != num_classes:
            raise WeightsError(
                f"--labels {labels} has {len(names)} names but the model has {num_classes} classes: "
                "give one name per class, one per line"
            )
        return names
    categories = IMAGENET.meta["categories"]
    if num_classes != len(categories):
        raise WeightsError(f"the model has {num_classes} classes: pass --labels FILE with {num_classes} names")
    return list(categories)


def preprocessing_transforms():
    """The weights' own eval transforms; resize and crop sizes are read off them."""
    return IMAGENET.transforms()
