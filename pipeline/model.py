"""The model: any image classifier of torchvision's registry, its weights found and checked, built, its classes named,
and its preprocessing and facts given. Another source of models changes this module only."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.hub import get_dir
from torchvision.models import get_model, get_model_weights, list_models

from pipeline.config import Refused

_logger = logging.getLogger(__name__)

DEFAULT_NAMES = ("imagenet", "DEFAULT")  # the architecture's default ImageNet weights
CPU_BYTES_PER_IMAGE = 7 * 2**20  # peak host memory of the forward per image on the CPU, fp32, 224x224 (measured:
#   7.0 MiB an image at batch 32, 6.8 at 128, normalised input included); it grows with the crop's area


class WeightsError(Refused):
    """The model, weights or labels cannot be used; the message names the fix."""


def architectures() -> list[str]:
    """Every image-classification model of torchvision's registry."""
    return list_models(module=torchvision.models)


@dataclass(frozen=True)
class WeightsSource:
    """Where the weights come from, checked before any worker starts or model is built."""

    architecture: str  # a name of torchvision's registry, e.g. 'resnet18'
    kind: str  # 'random', 'file', or the name of a weights enum member ('IMAGENET1K_V1')
    path: Path | None  # the file: the user's, or torchvision's cache for an enum member
    sha256: str  # fingerprint of the file; for 'random', of the architecture and the seed
    seed: int
    enum: object | None  # the torchvision WeightsEnum member, for named weights

    @property
    def default(self):
        """The architecture's default weights: transforms and categories for 'random' and files."""
        return get_model_weights(self.architecture).DEFAULT


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(weights) -> Path:
    """Where torchvision's weights API keeps a weights enum member's file (TORCH_HOME/hub/checkpoints/...)."""
    return Path(get_dir()) / "checkpoints" / Path(weights.url).name


def _fetch(weights, architecture: str) -> Path:
    path = cache_path(weights)
    if path.exists():
        return path
    try:
        weights.get_state_dict(progress=False, check_hash=True)  # downloads into the cache
    except Exception as error:
        other = ("or pass --weights PATH (a state_dict file of the model) or --weights random (a seeded random model, "
                 "for a smoke test); with make: WEIGHTS=PATH or WEIGHTS=random")
        raise WeightsError(
            f"the {architecture} weights {weights.name} are not in torchvision's cache ({path}) and could not be "
            f"downloaded ({type(error).__name__}: {error}). Fix: on a machine with internet, download "
            f"{weights.url} to {path} (or set TORCH_HOME to a folder holding hub/checkpoints/{path.name}), {other}"
        ) from error
    return path


def resolve_weights(architecture: str, weights: str, seed: int) -> WeightsSource:
    """Check that the model and the weights named on the command line can be had, without building the model."""
    if architecture not in architectures():
        raise WeightsError(f"--model {architecture} is not an image classifier of torchvision "
                           f"{torchvision.__version__}; choose one of: {', '.join(architectures())}")
    if weights == "random":
        fingerprint = hashlib.sha256(f"random-{architecture}-seed-{seed}".encode()).hexdigest()
        return WeightsSource(architecture, "random", None, fingerprint, seed, None)
    members = get_model_weights(architecture)
    if weights in DEFAULT_NAMES or weights in members.__members__:
        member = members.DEFAULT if weights in DEFAULT_NAMES else members[weights]
        path = _fetch(member, architecture)
        return WeightsSource(architecture, member.name, path, _sha256(path), seed, member)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file; pass 'imagenet' (or DEFAULT), one of "
                           f"{', '.join(members.__members__)}, 'random' or a state_dict file")
    try:
        return WeightsSource(architecture, "file", path.resolve(), _sha256(path), seed, None)
    except OSError as error:
        raise WeightsError(f"--weights {weights} cannot be read ({error.strerror}): make it readable") from error


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsError(f"--weights {path} cannot be read as a PyTorch file ({type(error).__name__}: {error}): "
                           "pass a complete state_dict or checkpoint saved with torch.save") from error
    for key in ("state_dict", "model"):  # checkpoints of torchvision's reference scripts
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise WeightsError(f"--weights {path} holds no state_dict (a dict of tensors, as model.state_dict() gives)")
    return loaded


def _build(source: WeightsSource) -> tuple[torch.nn.Module, int]:
    """The network in eval mode on the CPU, and its class count. A file's count is the first dimension of the
    parameters in which it differs from the network built with the default count (its classifier layer)."""
    if source.enum is not None:
        return get_model(source.architecture, weights=source.enum).eval(), len(source.enum.meta["categories"])
    classes = len(source.default.meta["categories"])
    if source.kind == "random":
        torch.manual_seed(source.seed)
        return get_model(source.architecture, weights=None, num_classes=classes).eval(), classes
    state = _state_dict(source.path)
    net = get_model(source.architecture, weights=None, num_classes=classes)
    built = net.state_dict()
    heads = {state[key].shape[0] for key, value in built.items()
             if key in state and value.dim() and state[key].dim() == value.dim()
             and state[key].shape[1:] == value.shape[1:] and state[key].shape[0] != value.shape[0]}
    if len(heads) == 1:  # a fine-tuned head: another class count
        classes = heads.pop()
        net = get_model(source.architecture, weights=None, num_classes=classes)
    _load_state(net, state, source)
    return net.eval(), classes


def _load_state(net: torch.nn.Module, state: dict[str, torch.Tensor], source: WeightsSource) -> None:
    fix = f"Pass the --model the weights were trained as, or {source.architecture} weights"
    try:
        loaded = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # parameters of other shapes
        raise WeightsError(f"--weights {source.path} does not fit {source.architecture}: {error}. {fix}") from error
    if loaded.missing_keys or loaded.unexpected_keys:
        raise WeightsError(f"--weights {source.path} does not fit {source.architecture}: "
                           f"{_some(loaded.missing_keys)} of its parameters missing, "
                           f"{_some(loaded.unexpected_keys)} unexpected. {fix}")


def _some(keys: list[str]) -> str:
    """'3 (a, b, c)', or '62 (a, b, c, ...)'."""
    return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else "none"


def _class_names(num_classes: int, labels: Path | None, weights) -> list[str]:
    """Names from --labels (one per line), else the weights' own categories."""
    if labels is not None:
        try:
            text = labels.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise WeightsError(f"--labels {labels} cannot be read as UTF-8 text ({error}): pass a text file with "
                               "one class name per line") from error
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != num_classes:
            raise WeightsError(f"--labels {labels} has {len(names)} names but the model has {num_classes} classes: "
                               "give one name per class, one per line")
        return names
    categories = weights.meta.get("categories") or []
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
        return {"model": f"torchvision.models.{self.source.architecture}", "weights": self.source.kind,
                "weights_sha256": self.source.sha256, "classes": self.classes,
                "labels_sha256": hashlib.sha256("\n".join(self.names).encode()).hexdigest(),
                "preprocessing": repr(self.transforms)}

    def cpu_bytes_per_image(self, crop_size: int) -> int:
        """Host memory the forward needs per image of a batch on the CPU (activations, normalised input)."""
        return CPU_BYTES_PER_IMAGE * crop_size * crop_size // (224 * 224)

    def facts(self) -> dict:
        """Facts about the model that do not decide a row's content."""
        return {"weights_path": str(self.source.path or "")}


def load(architecture: str, weights: str, seed: int, labels: Path | None) -> Model:
    """The model the options name, built and checked (raises WeightsError naming the fix)."""
    source = resolve_weights(architecture, weights, seed)
    net, classes = _build(source)
    described = source.enum or source.default  # files and random weights: the architecture's default recipe
    return Model(source, net, _class_names(classes, labels, described), described.transforms())
