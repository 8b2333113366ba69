"""Many processes, one output, on the CPU: ranks give exactly a single process's rows, one plan, per-rank resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.runfolder import MANIFEST_NAME, RunFolder
from tests.conftest import REPO, make_corpus, run_pipeline

# Batches of 2 in shards of 2: every batch is one shard, so a rank's batches are the single run's and every
# value, logits included, must come out bit for bit the same.
OPTIONS = ("--weights", "random", "--device", "cpu", "--shard-size", "2", "--batch-size", "2", "--workers", "0",
           "--progress", "log", "--max-error-rate", "1")
COLUMNS = ["path", "status", "error", "label", "label_name", "prob", "topk_labels", "topk_probs", "logits"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def read_rows(out: Path) -> dict:
    return ds.dataset(str(out), format="parquet").to_table().sort_by("path").to_pydict()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """11 images and a broken one, and the rows of one process classifying them."""
    root = tmp_path_factory.mktemp("many")
    make_corpus(root / "in", 11, size=(40, 32))
    (root / "in" / "d2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run_pipeline("classify", str(root / "in"), str(root / "single"), *OPTIONS)
    return root / "in", read_rows(root / "single")


def start(input_dir: Path, output_dir: Path, *args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "classify", str(input_dir), str(output_dir),
                                 *OPTIONS, *args], env={**ENV, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def assert_exactly_once_as_single(out: Path, single: dict) -> None:
    rows = read_rows(out)
    assert rows["path"] == single["path"], "every image exactly once"
    assert {column: rows[column] for column in COLUMNS} == {column: single[column] for column in COLUMNS}
    assert set(rows["run_id"]) == {RunFolder(out).load_plan().run_id}, "one plan for every rank"
    manifest = (out / MANIFEST_NAME).read_text()
    assert f'"rows": {len(single["path"])},' in manifest and '"error": 1' in manifest


@pytest.mark.slow
def test_ranks_started_together_then_one_process_finishes_what_a_missing_rank_left(corpus, tmp_path):
    input_dir, single = corpus
    out = tmp_path / "out"
    logs = {rank: tmp_path / f"rank{rank}.log" for rank in (0, 2)}

    ranks = [start(input_dir, out, "--rank", str(rank), "--world-size", "3", log=log) for rank, log in logs.items()]
    codes = [rank.wait(timeout=120) for rank in ranks]  # rank 1 never ran (say its array task failed)
    unfinished = run_pipeline("finalize", str(out), check=False)
    last = run_pipeline("classify", str(input_dir), str(out), *OPTIONS)  # one process: world size 1

    texts = [log.read_text() for log in logs.values()]
    assert codes == [0, 0], texts
    assert sum(text.count("planned 12 images in 6 shards") for text in texts) == 1, "one process planned"
    assert all(text.count("classifying 4 images (2 shards)") == 1 for text in texts)
    assert any("2 of 6 shards are not committed yet (shards 1, 4)" in text for text in texts), "the later one"
    assert unfinished.returncode == 10 and "(shards 1, 4)" in unfinished.stderr
    assert "classifying 4 images (2 shards) on cpu with 0 workers, 8 already committed" in last.stderr
    assert f"published {MANIFEST_NAME}" in last.stderr
    assert_exactly_once_as_single(out, single)
    assert run_pipeline("verify", str(out)).returncode == 0, "the project's own checker passes it"


@pytest.mark.slow
def test_torchrun_on_the_cpu(corpus, tmp_path):
    input_dir, single = corpus
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"no torchrun beside {sys.executable}")

    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipeline", "classify",
                             str(input_dir), str(tmp_path / "out"), *OPTIONS], env=ENV, capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "rank 1 of 2 (from torchrun RANK/WORLD_SIZE)" in result.stderr
    assert result.stderr.count(f"published {MANIFEST_NAME}") == 1, "the last rank to commit publishes it, once"
    assert_exactly_once_as_single(tmp_path / "out", single)


def committed_shards(out: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of every committed shard."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


@pytest.mark.slow
def test_a_killed_rank_redoes_only_its_own_unfinished_shards(corpus, tmp_path):
    input_dir, single = corpus
    out = tmp_path / "out"
    hold = {"PIPELINE_TEST_PAUSE": "shard-rename@2", "PIPELINE_TEST_PAUSE_S": "60"}  # its 2nd commit waits there
    rank0 = start(input_dir, out, "--rank", "0", "--world-size", "2", log=tmp_path / "rank0.log")
    rank1 = start(input_dir, out, "--rank", "1", "--world-size", "2", log=tmp_path / "killed.log", env=hold)
    deadline = time.monotonic() + 60
    while "test pause at shard-rename" not in (tmp_path / "killed.log").read_text():
        assert time.monotonic() < deadline and rank1.poll() is None, (tmp_path / "killed.log").read_text()
        time.sleep(0.01)
    rank1.send_signal(signal.SIGKILL)  # inside a commit: its shard is written, fsynced, not yet renamed
    rank1.wait()
    assert rank0.wait(timeout=60) == 0
    before = committed_shards(out)
    left = [shard for shard in (1, 3, 5) if not any(name.startswith(f"part-{shard:05d}") for name in before)]
    assert sorted(name[:10] for name in before if int(name[5:10]) % 2 == 0) == [
        "part-00000", "part-00002", "part-00004"], "rank 0 did its share"
    assert 1 <= len(left) <= 2 and not (out / MANIFEST_NAME).exists(), "rank 1 was killed with work left"
    assert list(out.glob(".part-*.tmp")), "the killed commit left its temp file"

    resumed = run_pipeline("classify", str(input_dir), str(out), *OPTIONS, "--rank", "1", "--world-size", "2")

    assert f"classifying {2 * len(left)} images ({len(left)} shards)" in resumed.stderr, "its unfinished ones only"
    after = committed_shards(out)
    assert {name: after[name] for name in before} == before, "committed shards untouched, rank 0's and its own"
    assert not list(out.glob(".part-*.tmp")), "its own temp files removed"
    assert f"published {MANIFEST_NAME}" in resumed.stderr
    assert_exactly_once_as_single(out, single)
