"""The model: find and check the weights, build torchvision's ResNet18 from them, name its classes, and give its
preprocessing and facts. Another architecture changes this module only."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.hub import get_dir
from torchvision.models import ResNet18_Weights, resnet18

from pipeline.config import Refused

_logger = logging.getLogger(__name__)

IMAGENET = ResNet18_Weights.IMAGENET1K_V1
CPU_BYTES_PER_IMAGE = 7 * 2**20  # peak host memory of the forward per image on the CPU, fp32, 224x224 (measured:
#   7.0 MiB an image at batch 32, 6.8 at 128, normalised input included); it grows with the crop's area


class WeightsError(Refused):
    """The weights or labels cannot be used; the message names the fix."""


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, checked before any worker starts or model is built."""

    kind: str  # 'imagenet', 'random' or 'file'
    path: Path | None  # the file for 'imagenet' (torchvision's cache) and 'file'
    sha256: str  # fingerprint of the file; for 'random', of the seed
    seed: int


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
            f"{IMAGENET.url} to {path} (or set TORCH_HOME to a folder holding hub/checkpoints/{path.name}), "
            + ("or pass WEIGHTS=PATH (a ResNet18 state_dict file) or WEIGHTS=random (a seeded random model, for a "
               "smoke test) to make" if "MAKELEVEL" in os.environ else
               "or pass --weights PATH to a ResNet18 state_dict file, or --weights random for a seeded random model "
               "(a smoke test)")
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
        raise WeightsError(f"--weights {path} cannot be read as a PyTorch file ({type(error).__name__}: {error}): "
                           "pass a complete state_dict or checkpoint saved with torch.save") from error
    for key in ("state_dict", "model"):  # checkpoints of torchvision's reference scripts
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or "fc.weight" not in loaded:
        raise WeightsError(f"--weights {path} holds no ResNet18 state_dict (no 'fc.weight' key)")
    return loaded


def _build(source: WeightsSource) -> torch.nn.Module:
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


def _class_names(num_classes: int, labels: Path | None) -> list[str]:
    """Names from --labels (one per line), else ImageNet's categories from the weights' metadata."""
    if labels is not None:
        try:
            text = labels.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"--labels {labels} cannot be read as UTF-8 text ({error}): pass a text file with "
                               "one class name per line") from error
        names = [line.strip() for line in text.splitlines() if line.strip()]
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


@dataclass
class Model:
    """A built, checked model: the network on the CPU, its class names, preprocessing and facts."""

    source: WeightsSource
    net: torch.nn.Module
    names: list[str]
    transforms: object  # the weights' own eval transforms (torchvision ImageClassification)

    @property
    def classes(self) -> int:
        return len(self.names)

    def identity(self) -> dict:
        """What about the model decides a row's content: part of the run's identity."""
        return {"model": "torchvision.models.resnet18", "weights": self.source.kind,
                "weights_sha256": self.source.sha256, "classes": self.classes,
                "labels_sha256": hashlib.sha256("\n".join(self.names).encode()).hexdigest(),
                "preprocessing": repr(self.transforms)}

    def cpu_bytes_per_image(self, crop_size: int) -> int:
        """Host memory the forward needs per image of a batch on the CPU (activations, normalised input)."""
        return CPU_BYTES_PER_IMAGE * crop_size * crop_size // (224 * 224)

    def facts(self) -> dict:
        """Facts about the model that do not decide a row's content."""
        return {"weights_path": str(self.source.path or "")}


def load(weights: str, seed: int, labels: Path | None) -> Model:
    """The model the options name, built and checked (raises WeightsError naming the fix)."""
    source = resolve_weights(weights, seed)
    net = _build(source)
    return Model(source, net, _class_names(net.fc.out_features, labels), IMAGENET.transforms())
