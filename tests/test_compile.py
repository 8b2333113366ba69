"""--compile: the model under torch.compile sees one input shape, gives the rows of the uncompiled
model, and a compile that fails leaves the run going, uncompiled, with a warning."""

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.decode import Batch
from pipeline.infer import Classifier
from pipeline.model import build_model, preprocessing_transforms, resolve_weights
from tests.conftest import make_corpus, run_pipeline

TRANSFORMS = preprocessing_transforms()


def _batches(sizes, seed=0):
    """Batches of worker-decoded images (the CPU path), sizes[i] images each, distinct pixels."""
    generator = torch.Generator().manual_seed(seed)
    batches, start = [], 0
    for size in sizes:
        images = torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8, generator=generator)
        batches.append(Batch(indices=torch.arange(start, start + size), errors=[None] * size, images=images,
                             decoded_at=list(range(size)), encoded=torch.empty(0, dtype=torch.uint8),
                             encoded_sizes=[], encoded_at=[]))
        start += size
    return batches


def _classifier(compile_model, batch_size=4):
    model = build_model(resolve_weights("random", seed=0))
    return Classifier(model, torch.device("cpu"), TRANSFORMS.mean, TRANSFORMS.std, topk=3,
                      compile_model=compile_model, batch_size=batch_size)


def test_the_compiled_model_sees_one_shape_and_rows_stay_in_place(monkeypatch):
    shapes = []

    def recording_compile(model, **options):  # stands in for torch.compile: records what the model is given
        assert options == {"dynamic": False}

        def compiled(x):
            shapes.append(tuple(x.shape))
            return model(x)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    batches = _batches([4, 4, 3])  # the last batch is short, as at the end of a run

    got = [scored.logits for scored in _classifier(compile_model=True).score(batches)]
    expected = [scored.logits for scored in _classifier(compile_model=False).score(_batches([4, 4, 3]))]

    assert shapes == [(4, 3, 224, 224)] * 3, "the short batch is padded to the batch size"
    assert [len(logits) for logits in got] == [4, 4, 3], "the padding rows are not returned"
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_a_compile_that_fails_leaves_the_model_uncompiled_and_says_so(monkeypatch, caplog):
    def failing_compile(model, **options):
        def compiled(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    classifier = _classifier(compile_model=True)

    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        got = [scored.logits for scored in classifier.score(_batches([4, 2]))]
    expected = [scored.logits for scored in _classifier(compile_model=False).score(_batches([4, 2]))]

    assert classifier.compiled is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["--compile: torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ "
                        "compiler found); the model runs uncompiled"]
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_compiled_run_writes_the_rows_of_an_uncompiled_one(tmp_path, weights_file):
    make_corpus(tmp_path / "in", 7, formats=("jpg", "png", "webp"))
    tables, logs = {}, {}
    for option in ("--compile", "--no-compile"):
        out = tmp_path / option.strip("-")
        result = run_pipeline("classify", str(tmp_path / "in"), str(out), "--weights", str(weights_file),
                              "--device", "cpu", "--batch-size", "4", "--workers", "1", option, timeout=600,
                              env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
        tables[option], logs[option] = pq.read_table(out).sort_by("path"), result.stderr

    compiled, plain = tables["--compile"], tables["--no-compile"]
    assert "torch.compile failed" not in logs["--compile"], logs["--compile"]
    assert compiled["path"].to_pylist() == plain["path"].to_pylist() and compiled.num_rows == 7
    assert compiled["status"].to_pylist() == ["ok"] * 7
    np.testing.assert_allclose(np.array(compiled["logits"].to_pylist()), np.array(plain["logits"].to_pylist()),
                               rtol=1e-4, atol=1e-4)
    assert compiled["label"].to_pylist() == plain["label"].to_pylist()
    metadata = pq.read_schema(next((tmp_path / "compile").glob("part-*.parquet"))).metadata
    assert json.loads(metadata[b"pipeline.run"])["config"]["compile"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run it on the device machine")
def test_on_a_gpu_the_model_compiles_in_the_warm_up_and_rows_match_the_cpu_path(tmp_path, weights_file):
    make_corpus(tmp_path / "in", 40, formats=("jpg", "png"), size=(320, 240))
    logits = {}
    for device, option in (("cuda", "--compile"), ("cpu", "--no-compile")):
        result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / device), "--weights", str(weights_file),
                              "--device", device, "--workers", "2", "--batch-size", "16", option, "-v", timeout=600)
        table = pq.read_table(tmp_path / device).sort_by("path")
        assert table["status"].to_pylist() == ["ok"] * 40
        logits[device] = np.array(table["logits"].to_pylist())
        if device == "cuda":
            assert "the model's first forward took" in result.stderr, "the warm-up thread compiled it"
            assert "warm-up failed" not in result.stderr and "torch.compile failed" not in result.stderr

    gpu, cpu = logits["cuda"], logits["cpu"]
    cosine = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cosine.min() >= 0.999
    assert (gpu.argmax(1) == cpu.argmax(1)).mean() >= 0.95
