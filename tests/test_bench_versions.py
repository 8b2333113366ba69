"""scripts/bench_versions.py compares two versions of the code only if each run imports its own version."""

import importlib
import shutil
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
bench_versions = importlib.import_module("bench_versions")


def test_each_run_imports_the_pipeline_of_its_own_folder(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(REPO / "pipeline", old / "pipeline")

    assert bench_versions.imported_from(old) == old / "pipeline"
    assert bench_versions.imported_from(REPO) == REPO / "pipeline"
