"""Many processes, one output, on the CPU: ranks give exactly a single process's rows, one plan, per-rank resume."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from pipeline.commit import MANIFEST_NAME
from pipeline.plan import load_plan
from tests.conftest import REPO, make_corpus, run_pipeline
from tests.held_image import HeldImage

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
    assert set(rows["run_id"]) == {load_plan(out).run_id}, "one plan for every rank"
    manifest = (out / MANIFEST_NAME).read_text()
    assert f'"rows": {len(single["path"])},' in manifest and '"error": 1' in manifest


@pytest.mark.slow
def test_ranks_started_together_write_what_one_process_writes(corpus, tmp_path):
    input_dir, single = corpus
    logs = [tmp_path / f"rank{rank}.log" for rank in range(3)]

    ranks = [start(input_dir, tmp_path / "out", "--rank", str(rank), "--world-size", "3", log=logs[rank])
             for rank in range(3)]
    codes = [rank.wait(timeout=120) for rank in ranks]

    texts = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], texts
    assert_exactly_once_as_single(tmp_path / "out", single)
    assert sum(text.count("planned 12 images in 6 shards") for text in texts) == 1, "one process planned"
    assert sum(text.count(f"published {MANIFEST_NAME}") for text in texts) == 1
    assert all(text.count("classifying 4 images (2 shards)") == 1 for text in texts)


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
    assert_exactly_once_as_single(tmp_path / "out", single)


def committed_shards(out: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of every committed shard."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


@pytest.mark.slow
def test_a_killed_rank_redoes_only_its_own_unfinished_shards(corpus, tmp_path):
    input_dir, single = corpus
    shutil.copytree(input_dir, tmp_path / "in", symlinks=True)
    held_path = single["path"][10]  # in shard 5, rank 1's last: it waits there with shard 1 committed
    image = shutil.move(tmp_path / "in" / held_path, tmp_path / "held.img")
    held = HeldImage(tmp_path / "in" / held_path, Path(image))
    out = tmp_path / "out"
    try:
        rank0 = start(tmp_path / "in", out, "--rank", "0", "--world-size", "2", log=tmp_path / "rank0.log")
        rank1 = start(tmp_path / "in", out, "--rank", "1", "--world-size", "2", log=tmp_path / "killed.log")
        deadline = time.monotonic() + 60
        while not list(out.glob("_shards/part-00001-*.json")):
            assert time.monotonic() < deadline and rank1.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        rank1.send_signal(signal.SIGKILL)
        rank1.wait()
        assert rank0.wait(timeout=60) == 0
        before = committed_shards(out)
        assert sorted(name[:10] for name in before) == ["part-00000", "part-00001", "part-00002", "part-00004"]
        assert not (out / MANIFEST_NAME).exists()

        held.feed()
        resumed = run_pipeline("classify", str(tmp_path / "in"), str(out), *OPTIONS, "--rank", "1",
                               "--world-size", "2")
    finally:
        held.close()

    assert "classifying 4 images (2 shards)" in resumed.stderr, "shards 3 and 5 only"
    after = committed_shards(out)
    assert {name: after[name] for name in before} == before, "committed shards untouched, rank 0's and its own"
    assert f"published {MANIFEST_NAME}" in resumed.stderr
    assert_exactly_once_as_single(out, single)
