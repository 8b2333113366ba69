"""The whole job in real processes: exact logits, one row per image, resume after kill -9, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from tests.conftest import REPO, make_corpus, run_pipeline, seeded_state_dict


def read_output(out):
    """Every row of every visible shard, sorted by path, as a dict of columns."""
    table = ds.dataset(str(out), format="parquet").to_table()
    return table.sort_by("path").to_pydict()


def reference_logits(root, relative_paths):
    """The plain torchvision recipe: the weights' transforms on the PIL image, one image at a time."""
    model = torch.nn.Module()
    from torchvision.models import resnet18

    model = resnet18()
    model.load_state_dict(seeded_state_dict())
    model.eval()
    transforms = ResNet18_Weights.IMAGENET1K_V1.transforms()
    out = []
    with torch.inference_mode():
        for relative in relative_paths:
            with Image.open(root / relative) as image:
                out.append(model(transforms(image.convert("RGB")).unsqueeze(0))[0].numpy())
    return np.stack(out)


def test_every_image_is_one_row_with_the_reference_logits(tmp_path, weights_file):
    paths = make_corpus(tmp_path / "in", 9)
    (tmp_path / "in" / "d0" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "d1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", str(weights_file),
                 "--device", "cpu", "--batch-size", "4", "--shard-size", "5", "--workers", "2",
                 "--max-error-rate", "0.5")

    rows = read_output(tmp_path / "out")
    assert rows["path"] == sorted(paths + ["d1/broken.jpg"])
    broken = rows["path"].index("d1/broken.jpg")
    assert rows["status"][broken] == "error" and rows["error"][broken] == "truncated image: Truncated File Read"
    assert rows["logits"][broken] is None and rows["label"][broken] is None
    ok = [i for i in range(len(rows["path"])) if i != broken]
    assert all(rows["status"][i] == "ok" and rows["error"][i] is None for i in ok)
    logits = np.array([rows["logits"][i] for i in ok], dtype=np.float32)
    expected = reference_logits(tmp_path / "in", [rows["path"][i] for i in ok])
    assert np.abs(logits - expected).max() < 1e-4
    assert [rows["label"][i] for i in ok] == expected.argmax(axis=1).tolist()
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["rows"] == 10 and manifest["status_counts"] == {"error": 1, "ok": 9}
    assert manifest["error_counts"] == {"truncated image": 1}
    assert manifest["run"]["ignored_files"] == 1


def test_rerunning_a_finished_output_changes_nothing(tmp_path):
    make_corpus(tmp_path / "in", 4)
    args = ("classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random", "--shard-size", "2",
            "--workers", "0")
    run_pipeline(*args)

    def snapshot():  # every file but the lock, which names its latest holder
        files = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.parent.name != "_locks"]
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}

    before = snapshot()

    result = run_pipeline(*args)

    after = snapshot()
    assert after == before
    assert "nothing to do" in result.stderr


def test_resuming_with_other_input_or_weights_is_refused(tmp_path, weights_file):
    make_corpus(tmp_path / "in", 3)
    make_corpus(tmp_path / "other", 3)
    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random", "--workers", "0")

    other_input = run_pipeline("classify", str(tmp_path / "other"), str(tmp_path / "out"), "--weights", "random",
                               check=False)
    other_weights = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights",
                                 str(weights_file), check=False)

    assert other_input.returncode == 2 and "was started with input_dir=" in other_input.stderr
    assert other_weights.returncode == 2 and "was started with weights=" in other_weights.stderr
    assert "or write to a new OUTPUT" in other_weights.stderr


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_rows(tmp_path):
    make_corpus(tmp_path / "in", 48, size=(64, 48))
    common = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--shard-size", "4", "--workers", "1"]
    run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "whole"), *common)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(tmp_path / "in"), str(out), *common],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not len(list(out.glob("part-*.parquet"))) >= 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the job and its DataLoader workers, as a node failure would
    process.wait()

    visible = list(out.glob("part-*.parquet"))
    assert 2 <= len(visible) < 12 and not (out / "_SUCCESS").exists(), "the kill must land mid-run"
    read_output(out)  # every visible shard is readable
    run_pipeline("classify", str(tmp_path / "in"), str(out), *common)

    whole, resumed = read_output(tmp_path / "whole"), read_output(out)
    assert resumed["path"] == whole["path"] and len(set(resumed["path"])) == 48
    assert resumed["status"] == whole["status"] and resumed["label"] == whole["label"]
    assert np.allclose(np.array(resumed["logits"]), np.array(whole["logits"]), atol=1e-5)


def test_resuming_with_other_logits_is_refused_before_any_work(tmp_path):
    from pipeline import runner
    from pipeline.config import Config
    from pipeline.prepare import PlanMismatch
    from tests.test_layout import _save_run

    make_corpus(tmp_path / "in", 1)
    _save_run(tmp_path / "out", tmp_path / "in", finished=False)  # a float32 run of the same input and weights

    with pytest.raises(PlanMismatch, match="was started with logits='float32', not 'float16'"):
        runner.run(Config(tmp_path / "in", tmp_path / "out", weights="random", workers=0, logits="float16"))
    assert not list((tmp_path / "out").glob("part-*"))
