"""The run's identity comes from the config: every option that changes what a row contains is in it, and a resume
that changes one is refused before anything is written; the other options may change on resume."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import prepare
from pipeline.config import Config, Refused, identity_options, resumable_options
from pipeline.source import open_source
from tests.conftest import REPO, run_pipeline, seeded_state_dict


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("".join(f"class {i}\n" for i in range(1000)))
    return path


def test_every_option_is_either_part_of_the_identity_or_may_change_on_resume():
    fields = [field.name for field in dataclasses.fields(Config)]
    assert sorted(identity_options() + resumable_options()) == sorted(fields)
    assert not set(identity_options()) & set(resumable_options())
    assert set(identity_options()) == {"input_dir", "model", "weights", "labels", "precision", "decode", "topk",
                                       "seed", "logits", "max_image_pixels", "jpeg_draft", "max_file_bytes",
                                       "decode_timeout", "input_list", "fingerprint"}


def test_the_docs_list_both_kinds_of_option():
    """docs/operations.md says which options a resume must keep and which it may change, as the code has them."""
    text = (REPO / "docs" / "operations.md").read_text()
    must, may = text.split("<!-- identity options -->")[1], text.split("<!-- resumable options -->")[1]
    must, may = must.split("<!-- end -->")[0], may.split("<!-- end -->")[0]
    flag = {"input_dir": "INPUT", "output_dir": "OUTPUT", "log_every_s": "log_every_s"}
    for name in identity_options():
        assert flag.get(name, f"--{name.replace('_', '-')}") in must, name
    for name in resumable_options():
        assert flag.get(name, f"--{name.replace('_', '-')}") in may, name


def _identity(config: Config) -> dict:
    return prepare.prepare(config, open_source(config)).identity


IDENTITY_CHANGES = {
    "input_dir": lambda base, tmp, labels: {"input_dir": tmp},
    "weights": lambda base, tmp, labels: {"weights": str(tmp / "weights.pt")},
    "labels": lambda base, tmp, labels: {"labels": labels},
    "precision": lambda base, tmp, labels: {"precision": "bf16"},
    "topk": lambda base, tmp, labels: {"topk": 3},
    "seed": lambda base, tmp, labels: {"seed": 1},
    "logits": lambda base, tmp, labels: {"logits": "float16"},
    "max_image_pixels": lambda base, tmp, labels: {"max_image_pixels": 1000},
    "model": lambda base, tmp, labels: {"model": "mobilenet_v3_small"},
    "jpeg_draft": lambda base, tmp, labels: {"jpeg_draft": True},
    "max_file_bytes": lambda base, tmp, labels: {"max_file_bytes": 1000},
    "decode_timeout": lambda base, tmp, labels: {"decode_timeout": 5.0},
    "input_list": lambda base, tmp, labels: {"input_dir": None, "input_list": tmp / "items.txt"},
    "fingerprint": lambda base, tmp, labels: {"fingerprint": "content"},
}
RESUMABLE_CHANGES = {
    "output_dir": {"output_dir": Path("elsewhere")}, "device": {"device": "cpu"}, "batch_size": {"batch_size": 3},
    "workers": {"workers": 0}, "shard_size": {"shard_size": 7}, "progress": {"progress": "log"},
    "log_every_s": {"log_every_s": 1.0}, "partition": {"partition": (("run_date", "2024-05-01"),)},
    "max_error_rate": {"max_error_rate": 0.5}, "rank": {"rank": 1}, "world_size": {"world_size": 2},
    "fetch_threads": {"fetch_threads": 4}, "incremental": {"incremental": True},
}


@pytest.mark.parametrize("name", sorted(IDENTITY_CHANGES))
def test_changing_an_identity_option_changes_the_identity(name, six_images, labels, tmp_path):
    torch.save(seeded_state_dict(seed=3), tmp_path / "weights.pt")
    base = Config(six_images, tmp_path / "out", weights="random", device="cpu")
    changed = dataclasses.replace(base, **IDENTITY_CHANGES[name](base, tmp_path, labels))
    assert _identity(changed) != _identity(base)


def test_the_decoder_is_part_of_the_identity_where_it_differs(six_images, monkeypatch):
    """On a GPU --decode auto sends plain JPEGs to nvJPEG, --decode cpu to Pillow: different pixels, so a resume may
    not switch. (On the CPU both are Pillow: the same rows.)"""
    base = Config(six_images, Path("out"), weights="random", device="auto")
    assert _identity(base)["decode"] == _identity(dataclasses.replace(base, decode="cpu"))["decode"] == "pillow"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _identity(base)["decode"] == "nvjpeg"
    assert _identity(dataclasses.replace(base, decode="cpu"))["decode"] == "pillow"
    assert _identity(base)["precision"] == "fp16"  # auto on a GPU


def test_the_other_options_leave_the_identity_alone(six_images):
    assert set(RESUMABLE_CHANGES) == set(resumable_options())
    base = Config(six_images, Path("out"), weights="random", device="cpu")
    expected = _identity(base)
    for name, change in RESUMABLE_CHANGES.items():
        assert _identity(dataclasses.replace(base, **change)) == expected, name


BASE = ["--weights", "random", "--device", "cpu", "--workers", "0", "--batch-size", "2", "--shard-size", "2"]


@pytest.fixture(scope="module")
def unfinished(six_images, tmp_path_factory) -> Path:
    """An output with one of its three shards committed: the run failed writing the second."""
    out = tmp_path_factory.mktemp("unfinished") / "out"
    result = run_pipeline("classify", str(six_images), str(out), *BASE, env={"PIPELINE_TEST_FAIL": "shard-fsync@2"},
                          check=False)
    assert result.returncode == 74, result.stderr
    assert len(list(out.glob("part-*.parquet"))) == 1
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and "_locks" not in path.parts}


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--topk", "3"], ["--labels", "LABELS"], ["--precision", "bf16"],
                                    ["--logits", "none"], ["--max-image-pixels", "5000"], ["--seed", "7"]],
                         ids=lambda change: change[0])
def test_a_resume_that_changes_what_a_row_contains_is_refused_and_changes_nothing(change, unfinished, labels,
                                                                                  tmp_path, six_images):
    """Before, a resume with another --topk, --labels, --precision or --decode mixed shards of two contents."""
    out = tmp_path / "out"
    shutil.copytree(unfinished, out)
    before = _snapshot(out)
    args = [str(labels) if arg == "LABELS" else arg for arg in change]
    result = run_pipeline("classify", str(six_images), str(out), *BASE, *args, check=False)
    assert result.returncode == 2, result.stderr
    assert "was started with" in result.stderr and "write to a new OUTPUT" in result.stderr
    assert _snapshot(out) == before


@pytest.mark.slow
def test_a_resume_may_change_every_other_option(unfinished, tmp_path, six_images):
    out = tmp_path / "out"
    shutil.copytree(unfinished, out)
    run_pipeline("classify", str(six_images), str(out), "--weights", "random", "--device", "cpu", "--workers", "1",
                 "--batch-size", "3", "--shard-size", "5", "--progress", "log", "--max-error-rate", "0.9",
                 "--rank", "0", "--world-size", "1")
    assert run_pipeline("verify", str(out)).returncode == 0


def test_a_batch_size_is_refused_when_its_batches_in_flight_do_not_fit_naming_the_largest_that_does(six_images):
    config = Config(six_images, Path("out"), weights="random", device="cpu", workers=2, batch_size=100_000)
    built = prepare.model.load("resnet18", "random", 0, None)
    per_image, in_flight = prepare.batch_bytes(config, built, "cpu")
    assert in_flight == 2 * 4 + 3 and per_image == 3 * 224 * 224 * in_flight + 7 * 2**20
    available = 8 * 2**30
    fits = (available - prepare.PROCESS_BYTES) // per_image

    with pytest.raises(Refused, match=rf"--batch-size 100000 needs about .* GiB .* 8.0 GiB is available here .*: "
                                      rf"use --batch-size {fits} or less \(or fewer --workers\)"):
        prepare.check_batch_memory(config, built, "cpu", available)
    prepare.check_batch_memory(dataclasses.replace(config, batch_size=fits), built, "cpu", available)
    with pytest.raises(Refused):
        prepare.check_batch_memory(dataclasses.replace(config, batch_size=fits + 1), built, "cpu", available)
    prepare.check_batch_memory(config, built, "cpu", None)  # nothing known: nothing refused
    assert prepare.host_memory_available() > 0
