"""Fixtures shared by the tests. The images and seeded weights come from scripts/synthetic.py, which the scripts
use too; the tests import them from here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.synthetic import make_corpus, seeded_state_dict, write_image

__all__ = ["REPO", "make_corpus", "run_pipeline", "seeded_state_dict", "weights_file", "write_image"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def six_images(tmp_path_factory) -> Path:
    """Six small images (JPEG, PNG, WebP) in nested folders, shared by the tests that only read them."""
    folder = tmp_path_factory.mktemp("six-images")
    make_corpus(folder, 6)
    return folder


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-seeded.pt"
    torch.save(seeded_state_dict(), path)
    return path


def run_pipeline(*args: str, env: dict | None = None, check: bool = True, timeout: float = 300,
                 prefix: list[str] | None = None):
    """`python -m pipeline ARGS` in a real process, as cron would run it; prefix (e.g. setpriv ...) runs first."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([*(prefix or []), sys.executable, "-m", "pipeline", *args], capture_output=True,
                            text=True, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {args} exited {result.returncode}:\n{result.stderr}")
    return result
