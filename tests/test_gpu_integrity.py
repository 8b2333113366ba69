"""scripts/gpu_integrity.py passes runs whose rows match the reference run and names those that do not
(tried here on the CPU device; on a GPU it compares full-speed runs with a CUDA_LAUNCH_BLOCKING run)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, make_corpus


def _check(tmp_path, *options):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_integrity.py"), str(tmp_path / "in"),
                           "--device", "cpu", "--runs", "1", "--work", str(tmp_path / "work"),
                           "--json", str(tmp_path / "result.json"), *options],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_matching_runs_pass_and_a_bar_they_miss_fails_naming_the_rows(tmp_path):
    make_corpus(tmp_path / "in", 6, formats=("jpg",), size=(160, 120))

    passed = _check(tmp_path)
    assert passed.returncode == 0, passed.stderr
    assert "every row matches the reference" in passed.stdout
    result = json.loads((tmp_path / "result.json").read_text())[0]
    assert result["rows"] == 6 and result["rows_below_min_cosine"] == 0 and result["labels_differing"] == 0

    failed = _check(tmp_path, "--min-cosine", "1.01")  # no cosine reaches it: every row is named
    assert failed.returncode == 1
    assert "ROWS DIFFER" in failed.stdout
    result = json.loads((tmp_path / "result.json").read_text())[0]
    assert result["rows_below_min_cosine"] == 6 and len(result["worst"]) == 6
