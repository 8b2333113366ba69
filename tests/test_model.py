"""Weights in every form the command takes, class names, and the offline message."""

import pytest
import torch

from pipeline.model import WeightsError, load, resolve_weights
from tests.conftest import run_pipeline, seeded_state_dict, write_image


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_a_file_loads_as_plain_state_dict_or_checkpoint(tmp_path, wrap):
    state = seeded_state_dict(seed=3)
    path = tmp_path / "w.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 7}, path)

    model = load(str(path), seed=0, labels=None).net

    assert not model.training
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.layer1[0].bn1.running_mean, state["layer1.0.bn1.running_mean"])


def test_class_count_comes_from_fc_and_labels_must_match(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(seeded_state_dict(num_classes=3), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\nbird\n")
    model = load(str(path), seed=0, labels=labels)
    assert model.net.fc.out_features == 3 and model.classes == 3

    assert model.names == ["cat", "dog", "bird"]
    with pytest.raises(WeightsError, match="model has 3 classes: pass --labels"):
        load(str(path), seed=0, labels=None)
    labels.write_text("cat\ndog\n")
    with pytest.raises(WeightsError, match="2 names but the model has 3 classes"):
        load(str(path), seed=0, labels=labels)


def test_imagenet_names_are_the_weights_categories():
    names = load("random", seed=0, labels=None).names
    assert names[0] == "tench" and len(names) == 1000


def test_random_weights_are_seeded():
    a = load("random", seed=5, labels=None).net
    b = load("random", seed=5, labels=None).net
    c = load("random", seed=6, labels=None).net
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_bad_weight_files_are_refused_with_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.pt"), seed=0)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot be read"):
        load(str(tmp_path / "junk.pt"), seed=0, labels=None)
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="no ResNet18 state_dict"):
        load(str(tmp_path / "other.pt"), seed=0, labels=None)


def test_imagenet_offline_without_cache_exits_with_what_to_do(tmp_path):
    write_image(tmp_path / "in" / "a.png", 0)
    offline = {"TORCH_HOME": str(tmp_path / "torch-home"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9"}

    result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), env=offline, check=False)

    assert result.returncode == 2
    cache = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"not in torchvision's cache ({cache})" in result.stderr
    assert "--weights PATH" in result.stderr
    assert not (tmp_path / "out" / "_plan.arrow").exists(), "nothing is planned before the weights are found"
