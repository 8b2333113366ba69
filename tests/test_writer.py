"""The shard writer: rows buffered into whole shards, each committed whole, in plan order."""

import pyarrow.parquet as pq
import pytest

from pipeline.runfolder import RunFolder
from pipeline.writer import ShardWriter
from tests.test_parquet import NAMES, _plan, _scored


def test_batches_that_straddle_shards_commit_each_shard_whole(tmp_path):
    plan = _plan(7, 3)
    writer = ShardWriter(RunFolder(tmp_path), plan, NAMES, {})
    writer.add(_scored([0, 1], [None, None]))
    writer.add(_scored([2, 3, 4, 5], [None, "bad", None, None]))
    writer.wait()
    assert sorted(writer.committed) == [0, 1]
    writer.add(_scored([6], [None]))
    writer.close()

    shards = sorted(tmp_path.glob("part-*.parquet"))
    assert [pq.read_metadata(s).num_rows for s in shards] == [3, 3, 1]
    paths = [p for s in shards for p in pq.read_table(s)["path"].to_pylist()]
    assert paths == plan.paths.to_pylist()
    assert writer.committed[1]["status_counts"] == {"error": 1, "ok": 2}


def test_rows_out_of_plan_order_are_refused(tmp_path):
    plan = _plan(4, 2)
    writer = ShardWriter(RunFolder(tmp_path), plan, NAMES, {})
    with pytest.raises(RuntimeError, match="not in plan order"):
        writer.add(_scored([1, 0], [None, None]))
    writer.close()
    assert not list(tmp_path.glob("part-*"))


def test_logits_that_are_not_one_per_class_are_refused(tmp_path):
    plan = _plan(2, 2)
    writer = ShardWriter(RunFolder(tmp_path), plan, NAMES[:3], {})  # three names, four logits a row
    with pytest.raises(RuntimeError, match=r"logits of lengths \[4\], not 3"):
        writer.add(_scored([0, 1], [None, None]))
    writer.close()
    assert not list(tmp_path.glob("part-*"))


def test_shard_records_count_errors_by_cause(tmp_path):
    plan = _plan(4, 4)
    writer = ShardWriter(RunFolder(tmp_path), plan, NAMES, {})
    writer.add(_scored([0, 1, 2, 3], ["empty file", None, "truncated image: cut at 10 bytes", "empty file"]))
    writer.close()
    assert writer.committed[0]["status_counts"] == {"error": 3, "ok": 1}
    assert writer.committed[0]["error_counts"] == {"empty file": 2, "truncated image": 1}
