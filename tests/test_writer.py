"""Rows and shards: one row per item in plan order, nulls for errors, whole shards only."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.decode import Batch
from pipeline.infer import Scored
from pipeline.plan import Listing, new_plan
from pipeline.writer import SCHEMA, ShardWriter, encode_shard, rows

NAMES = [f"class{i}" for i in range(4)]


def _scored(indices, errors):
    n_ok = sum(e is None for e in errors)
    rng = np.random.default_rng(indices[0])
    logits = rng.normal(size=(n_ok, 4)).astype(np.float32)
    order = np.argsort(-logits, axis=1)[:, :2].astype(np.int32)
    probs = np.sort(rng.uniform(size=(n_ok, 2)).astype(np.float32), axis=1)[:, ::-1].copy()
    decoded_at = [i for i, error in enumerate(errors) if error is None]
    batch = Batch(torch.tensor(indices), errors, torch.zeros((n_ok, 3, 2, 2), dtype=torch.uint8), decoded_at,
                  torch.empty(0, dtype=torch.uint8), [], [])
    return Scored(batch, logits, order, probs)


def _plan(n, shard_size):
    return new_plan(Listing([f"img{i:02d}.png" for i in range(n)], 0), shard_size, {})


def test_rows_put_results_at_ok_positions_and_nulls_at_errors():
    plan = _plan(4, 10)
    scored = _scored([0, 1, 2, 3], [None, "OSError: broken", None, None])

    table = rows(scored, plan.paths, pa.array(NAMES))

    assert table.schema == SCHEMA
    assert table["path"].to_pylist() == ["img00.png", "img01.png", "img02.png", "img03.png"]
    assert table["status"].to_pylist() == ["ok", "error", "ok", "ok"]
    assert table["error"].to_pylist() == [None, "OSError: broken", None, None]
    assert table["label"].to_pylist() == [scored.topk_labels[0, 0], None, scored.topk_labels[1, 0],
                                          scored.topk_labels[2, 0]]
    assert table["label_name"][2].as_py() == NAMES[scored.topk_labels[1, 0]]
    assert table["logits"][1].as_py() is None and table["topk_probs"][1].as_py() is None
    assert np.allclose(table["logits"][3].as_py(), scored.logits[2])
    assert table["prob"][3].as_py() == pytest.approx(float(scored.topk_probs[2, 0]))


def test_a_shard_round_trips_through_parquet_with_run_metadata():
    plan = _plan(3, 10)
    table = rows(_scored([0, 1, 2], [None, None, "x"]), plan.paths, pa.array(NAMES))

    data = encode_shard(table, {"run_id": plan.run_id})

    read = pq.read_table(pa.BufferReader(data))
    assert read.equals(table.replace_schema_metadata(read.schema.metadata))
    assert read.schema.metadata[b"schema_version"] == b"1"
    assert plan.run_id.encode() in read.schema.metadata[b"pipeline.run"]
    assert pq.read_metadata(pa.BufferReader(data)).num_row_groups == 1


def test_batches_that_straddle_shards_commit_each_shard_whole(tmp_path):
    plan = _plan(7, 3)
    writer = ShardWriter(tmp_path, plan, NAMES, {})
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
    writer = ShardWriter(tmp_path, plan, NAMES, {})
    with pytest.raises(RuntimeError, match="not in plan order"):
        writer.add(_scored([1, 0], [None, None]))
    writer.close()
    assert not list(tmp_path.glob("part-*"))
