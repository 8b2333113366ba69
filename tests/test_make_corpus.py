"""Smoke test for scripts/make_corpus.py (needs scikit-image or scikit-learn for photos)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_corpus.py"


def _require_sources():
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")
    for module in ("skimage", "sklearn"):
        try:
            pytest.importorskip(module)
            return
        except pytest.skip.Exception:
            pass
    pytest.skip("make_corpus needs scikit-image or scikit-learn for its source photos")


def test_make_corpus_writes_readable_jpegs(tmp_path):
    _require_sources()
    from PIL import Image

    out = tmp_path / "corpus"
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--count", "20", "--jobs", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "summary: files=20" in result.stdout

    files = sorted(out.glob("*/*.jpg"))
    assert len(files) == 20
    for path in files:
        with Image.open(path) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            assert 333 <= img.width <= 800
            assert 0.5 <= img.width / img.height <= 2.0
    assert json.loads((out / "_corpus.json").read_text())["spec"]["count"] == 20

    # A second run with the same arguments finds the complete corpus and does nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to do" in again.stderr
