"""Weights in every form the command takes, class names, and the offline message."""

import dataclasses
import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import get_model, get_model_weights

from pipeline import runner
from pipeline.config import Config, Refused
from pipeline.decode import Preprocess, decode_file
from pipeline.failures import failed_rows
from pipeline.infer import Classifier
from pipeline.model import WeightsError, load, resolve_weights
from scripts.synthetic import nontrivial_state_dict
from tests.conftest import run_pipeline, seeded_state_dict, write_image


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_a_file_loads_as_plain_state_dict_or_checkpoint(tmp_path, wrap):
    state = seeded_state_dict(seed=3)
    path = tmp_path / "w.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 7}, path)

    model = load("resnet18", str(path), seed=0, labels=None).net

    assert not model.training
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.layer1[0].bn1.running_mean, state["layer1.0.bn1.running_mean"])


def test_class_count_comes_from_fc_and_labels_must_match(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(seeded_state_dict(num_classes=3), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nbird\n")
    model = load("resnet18", str(path), seed=0, labels=labels)
    assert model.net.fc.out_features == 3 and model.classes == 3

    assert model.names == ["cat", "dog", "bird"]
    with pytest.raises(WeightsError, match="model has 3 classes: pass --labels"):
        load("resnet18", str(path), seed=0, labels=None)
    labels.write_text("cat\ndog\n")
    with pytest.raises(WeightsError, match="2 names but the model has 3 classes"):
        load("resnet18", str(path), seed=0, labels=labels)


def test_a_regnet_loads_random_and_from_a_file_with_its_own_head(tmp_path):
    """RegNets compute their widths from tensors as they are built, so they cannot be built on the meta device (which
    the class count's probe once did: every regnet crashed)."""
    assert load("regnet_x_400mf", "random", seed=0, labels=None).classes == 1000
    net = get_model("regnet_x_400mf", weights=None, num_classes=4)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")

    model = load("regnet_x_400mf", str(tmp_path / "w.pt"), seed=0, labels=tmp_path / "labels.txt")

    assert model.classes == 4 and torch.equal(model.net.fc.weight, net.fc.weight)


def test_imagenet_names_are_the_weights_categories():
    names = load("resnet18", "random", seed=0, labels=None).names
    assert names[0] == "tench" and len(names) == 1000


def test_random_weights_are_seeded():
    a = load("resnet18", "random", seed=5, labels=None).net
    b = load("resnet18", "random", seed=5, labels=None).net
    c = load("resnet18", "random", seed=6, labels=None).net
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_bad_weight_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights("resnet18", str(tmp_path / "missing.pt"), seed=0)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot be read"):
        load("resnet18", str(tmp_path / "junk.pt"), seed=0, labels=None)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"does not fit resnet18: 102 \(conv1.weight, bn1.weight, bn1.bias, \.\.\.\) "
                                           r"of its parameters missing, 1 \(something\) unexpected"):
        load("resnet18", str(tmp_path / "other.pt"), seed=0, labels=None)


def test_imagenet_offline_without_cache_exits_with_what_to_do(tmp_path):
    write_image(tmp_path / "in" / "a.png", 0)
    offline = {"TORCH_HOME": str(tmp_path / "torch-home"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}

    result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), env=offline, check=False)

    assert result.returncode == 2
    cache = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"not in torchvision's cache ({cache})" in result.stderr
    assert "--weights PATH" in result.stderr and "--weights random" in result.stderr
    assert "with make: WEIGHTS=PATH or WEIGHTS=random" in result.stderr
    assert not (tmp_path / "out" / "_plan.arrow").exists(), "nothing is planned before the weights are found"


TESTED_MODELS = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16",
                 "swin_t"]


def _images(folder):
    """Three small real files: a JPEG, a grey PNG, a tall WebP (each is upscaled: resizing matters)."""
    return [write_image(folder / "a.jpg", 1, size=(97, 73), quality=90),
            write_image(folder / "b.png", 2, size=(120, 90), mode="L"),
            write_image(folder / "c.webp", 3, size=(64, 200), quality=90)]


@pytest.mark.parametrize("architecture", TESTED_MODELS)
def test_the_cpu_path_feeds_the_model_exactly_its_weights_transforms_of_the_pil_image(architecture, tmp_path):
    """Bit for bit: decode (resize, crop) in the workers, then normalisation as the classifier does it, against
    `weights.transforms()` on the PIL image (bilinear and bicubic, each model's own sizes)."""
    transforms = get_model_weights(architecture).DEFAULT.transforms()
    preprocess = Preprocess.from_transforms(transforms)
    mean = torch.tensor(transforms.mean).view(3, 1, 1)
    std = torch.tensor(transforms.std).view(3, 1, 1)
    for path in _images(tmp_path):
        fed = (decode_file(path, preprocess).float() / 255 - mean) / std
        with Image.open(path) as image:
            assert torch.equal(fed, transforms(image.convert("RGB"))), path.name


@pytest.mark.slow
@pytest.mark.parametrize("architecture", TESTED_MODELS)
def test_every_tested_model_gives_the_rows_of_torchvisions_recipe(architecture, tmp_path):
    """A fine-tuned-style checkpoint of each model (seeded random weights, 5 classes, saved by the test, with its
    labels), classified by the job as two ranks, then resumed, then read back by verify and errors, equals the
    plain recipe image by image: weights.transforms() on PIL, fp32."""
    net = get_model(architecture, weights=None, num_classes=5).eval()
    net.load_state_dict(nontrivial_state_dict(architecture, seed=11, num_classes=5))
    torch.save({"model": net.state_dict()}, tmp_path / "w.pt")
    (tmp_path / "labels.txt").write_text("ant\nbee\ncat\ndog\neel\n")
    _images(tmp_path / "in")
    (tmp_path / "in" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    config = Config(tmp_path / "in", tmp_path / "out", model=architecture, weights=str(tmp_path / "w.pt"),
                    labels=tmp_path / "labels.txt", device="cpu", workers=0, batch_size=2, shard_size=2, topk=3,
                    max_error_rate=0.5)

    for rank in (0, 1):  # two ranks of one world: each commits its shard, the last publishes _SUCCESS
        assert runner.run(dataclasses.replace(config, rank=rank, world_size=2)).images_this_run == 2
    resumed = runner.run(config)

    assert (resumed.images_this_run, resumed.ok, resumed.errors) == (0, 3, 1)
    assert [path for path, _ in failed_rows(tmp_path / "out")] == ["d.png"]
    assert run_pipeline("verify", str(tmp_path / "out")).returncode == 0
    rows = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).to_pydict()
    transforms = get_model_weights(architecture).DEFAULT.transforms()
    with torch.inference_mode():
        for path, logits, label_name in zip(rows["path"], rows["logits"], rows["label_name"], strict=True):
            if path == "d.png":
                continue
            with Image.open(tmp_path / "in" / path) as image:
                expected = net(transforms(image.convert("RGB")).unsqueeze(0))[0]
            assert expected.std() > 0.05, "the weights must give logits that differ, or the check proves nothing"
            assert torch.allclose(torch.tensor(logits), expected, rtol=1e-4, atol=1e-4), path
            assert label_name == ["ant", "bee", "cat", "dog", "eel"][int(torch.tensor(logits).argmax())]
    facts = json.loads(pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).metadata[b"pipeline.run"])
    assert facts["model"] == f"torchvision.models.{architecture}" and facts["classes"] == 5


def test_out_of_gpu_memory_is_exit_2_naming_a_smaller_batch(tmp_path, monkeypatch):
    """A CUDA out-of-memory during the run becomes a message with the fix, not a traceback; the committed shards
    stay (the batch size may change on resume). The CPU stands in for the GPU: its forward raises the CUDA error."""
    _images(tmp_path / "in")

    def out_of_memory(self, images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Classifier, "forward", out_of_memory)
    config = Config(tmp_path / "in", tmp_path / "out", weights="random", device="cpu", workers=0, batch_size=64)
    with pytest.raises(Refused, match="out of GPU memory with resnet18 at --batch-size 64: run the same command with "
                                      "--batch-size 32"):
        runner.run(config)


def test_an_unknown_model_and_weights_of_another_model_are_refused_with_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="not an image classifier of torchvision"):
        load("resnet19", "random", seed=0, labels=None)
    torch.save(seeded_state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(WeightsError, match="does not fit vit_b_16: .* of its parameters missing"):
        load("vit_b_16", str(tmp_path / "resnet18.pt"), seed=0, labels=None)
    with pytest.raises(WeightsError, match="does not fit resnet50"):
        load("resnet50", str(tmp_path / "resnet18.pt"), seed=0, labels=None)


def test_named_weights_are_looked_up_in_torchvisions_cache(tmp_path, monkeypatch):
    """`--weights IMAGENET1K_V2` (a member of the model's weights enum) and `imagenet`/`DEFAULT` (the default member)
    are found under TORCH_HOME/hub/checkpoints; a file placed there by hand is used as is, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    state = get_model("resnet50", weights=None).state_dict()
    v2 = get_model_weights("resnet50").IMAGENET1K_V2
    torch.save(state, checkpoints / v2.url.rsplit("/", 1)[1])
    source = resolve_weights("resnet50", "IMAGENET1K_V2", seed=0)
    assert source.kind == "IMAGENET1K_V2" and source.path == checkpoints / v2.url.rsplit("/", 1)[1]
    assert resolve_weights("resnet50", "DEFAULT", seed=0).kind == "IMAGENET1K_V2"  # resnet50's default
    with pytest.raises(WeightsError, match="IMAGENET1K_V1 are not in torchvision's cache"):
        resolve_weights("resnet50", "IMAGENET1K_V1", seed=0)
