"""Reading failed rows back from real Parquet shards: all of them in plan order, as text or JSON lines."""

import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipeline.failures import OutputError, failed_rows, first_failures, print_failures
from pipeline.parquet import counts, encode_shard, rows, with_run_columns
from pipeline.plan import new_plan
from pipeline.runfolder import RunFolder
from pipeline.source import Listing
from tests.conftest import REPO, make_corpus, run_pipeline
from tests.test_parquet import NAMES, _scored

PATHS = ["a.jpg", "b/new\nline.png", "c.png", "d é.webp", "e.gif", "f.tif", "g.bmp"]
ERRORS = [None, "empty file", None, "not an image (looks like HTML)", None, None,
          "decoder crashed: killed by SIGSEGV"]


def _output(out):
    plan = new_plan(Listing(PATHS, 0), 3, {})
    folder = RunFolder(out)
    folder.open_plan(lambda: plan)
    for shard in range(plan.shard_count):
        indices = list(plan.shard_range(shard))
        table = rows(_scored(indices, [ERRORS[i] for i in indices]), plan.paths, pa.array(NAMES))
        table = with_run_columns(table, plan.run_id, plan.facts["created_at"])
        folder.commit(plan, shard, encode_shard(table, {}), *counts(table))
    (out / ".part-00009-x.parquet.123.tmp").write_bytes(b"a leftover temporary file is never read")
    return plan


def test_failed_rows_are_read_back_in_plan_order(tmp_path):
    _output(tmp_path)
    expected = [(PATHS[i], ERRORS[i]) for i in (1, 3, 6)]
    assert list(failed_rows(tmp_path)) == expected
    assert first_failures(tmp_path, limit=2) == expected[:2]


def test_text_and_json_lines(tmp_path):
    _output(tmp_path)
    text, jsonl = io.StringIO(), io.StringIO()

    assert print_failures(tmp_path, as_json=False, out=text) == 3
    print_failures(tmp_path, as_json=True, out=jsonl)

    assert text.getvalue().splitlines() == [
        "b/new\\nline.png\tempty file",  # a newline in a name cannot split a line
        "d é.webp\tnot an image (looks like HTML)",
        "g.bmp\tdecoder crashed: killed by SIGSEGV",
    ]
    records = [json.loads(line) for line in jsonl.getvalue().splitlines()]
    assert records[0] == {"path": "b/new\nline.png", "cause": "empty file", "error": "empty file"}
    assert records[2] == {"path": "g.bmp", "cause": "decoder crashed", "error": "decoder crashed: killed by SIGSEGV"}


def test_a_folder_that_is_no_output_is_refused_with_the_fix(tmp_path):
    with pytest.raises(OutputError, match="has no _plan.arrow.*pass the OUTPUT folder"):
        list(failed_rows(tmp_path))
    (tmp_path / "run_date=2024-05-01").mkdir()
    _output(tmp_path / "run_date=2024-05-01")
    with pytest.raises(OutputError, match=r"holds partitioned runs: pass one run's folder, for example .*run_date="):
        list(failed_rows(tmp_path))
    assert len(list(failed_rows(tmp_path / "run_date=2024-05-01"))) == 3


def test_the_job_does_not_import_the_dataset_reader_until_it_reads_failures():
    """pyarrow.dataset imports pandas where it is installed: 0.4 s of every start on the GPU machine."""
    code = "import sys, pipeline.runner; print('pyarrow.dataset' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["input-is-output", "input-inside-output"])
def test_only_the_plans_own_shards_are_read_back_whatever_else_output_holds(where, tmp_path):
    """With INPUT inside (or equal to) OUTPUT, a finished run with error rows used to exit 1 on every rerun and in
    `pipeline errors` (ArrowInvalid: Could not read schema from '…/000.jpg'): the images were read as output."""
    out = tmp_path / "out"
    images = out if where == "input-is-output" else out / "images"
    make_corpus(images, 3)
    (images / "broken.jpg").write_bytes(b"<!doctype html><html></html>")
    args = ["--weights", "random", "--device", "cpu", "--workers", "0", "--max-error-rate", "1"]
    first = run_pipeline("classify", str(images), str(out), *args)
    assert "broken.jpg" in first.stderr  # the summary's first failed files
    again = run_pipeline("classify", str(images), str(out), *args)
    assert "nothing to do" in again.stderr
    listed = run_pipeline("errors", str(out)).stdout.splitlines()
    assert listed == ["broken.jpg\tnot an image (looks like HTML)"]
    assert run_pipeline("verify", str(out)).returncode == 0
