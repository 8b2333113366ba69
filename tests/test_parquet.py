"""The output format: one row per item in plan order, nulls for errors, a shard's encoding and schema."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.decode import Batch
from pipeline.infer import Scored
from pipeline.parquet import ROW_FIELDS, SCHEMA, encode_shard, rows, with_run_columns
from pipeline.plan import new_plan
from pipeline.source import Listing

NAMES = [f"class{i}" for i in range(4)]


def _scored(indices, errors):
    n_ok = sum(e is None for e in errors)
    rng = np.random.default_rng(indices[0])
    logits = rng.normal(size=(n_ok, 4)).astype(np.float32)
    order = np.argsort(-logits, axis=1)[:, :2].astype(np.int32)
    probs = np.sort(rng.uniform(size=(n_ok, 2)).astype(np.float32), axis=1)[:, ::-1].copy()
    decoded_at = [i for i, error in enumerate(errors) if error is None]
    batch = Batch(torch.tensor(indices), errors, torch.zeros((n_ok, 3, 2, 2), dtype=torch.uint8), decoded_at,
                  torch.empty(0, dtype=torch.uint8), [], [], [])
    return Scored(batch, logits, order, probs)


def _plan(n, shard_size):
    return new_plan(Listing([f"img{i:02d}.png" for i in range(n)], 0), shard_size, {})


def test_rows_put_results_at_ok_positions_and_nulls_at_errors():
    plan = _plan(4, 10)
    scored = _scored([0, 1, 2, 3], [None, "OSError: broken", None, None])

    table = rows(scored, plan.paths, pa.array(NAMES))

    assert table.schema == pa.schema(ROW_FIELDS)
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
    table = with_run_columns(table, plan.run_id, plan.facts["created_at"])

    data = encode_shard(table, {"run_id": plan.run_id})

    read = pq.read_table(pa.BufferReader(data))
    assert read.schema.equals(SCHEMA)
    assert read.equals(table.replace_schema_metadata(read.schema.metadata))
    assert read.schema.metadata[b"schema_version"] == b"3"
    assert plan.run_id.encode() in read.schema.metadata[b"pipeline.run"]
    assert pq.read_metadata(pa.BufferReader(data)).num_row_groups == 1


@pytest.mark.parametrize("choice", ["float32", "float16", "none"])
def test_every_logits_choice_keeps_one_schema_and_the_top_k(choice):
    plan = _plan(3, 10)
    scored = _scored([0, 1, 2], [None, "bad", None])
    scored.logits[0, 0] = 1 / 3  # not a half-precision number

    table = rows(scored, plan.paths, pa.array(NAMES), logits=choice)

    assert table.schema == pa.schema(ROW_FIELDS), "BigQuery wildcard loads need one schema for every choice"
    assert table["topk_labels"].to_pylist() == rows(scored, plan.paths, pa.array(NAMES))["topk_labels"].to_pylist()
    stored = table["logits"].to_pylist()
    if choice == "none":
        assert stored == [None, None, None]
        return
    assert stored[1] is None
    expected = scored.logits if choice == "float32" else scored.logits.astype(np.float16).astype(np.float32)
    assert np.array_equal(np.array([stored[0], stored[2]], dtype=np.float32), expected)
    assert (stored[0][0] == np.float32(1 / 3)) == (choice == "float32")


def test_a_shard_is_one_row_group_with_split_floats_zstd_and_utc_microseconds():
    plan = _plan(3, 10)
    table = with_run_columns(rows(_scored([0, 1, 2], [None, None, "x"]), plan.paths, pa.array(NAMES)),
                             plan.run_id, "2024-05-01T23:59:58.123456+00:00")

    meta = pq.read_metadata(pa.BufferReader(encode_shard(table, {})))

    assert meta.num_row_groups == 1
    chunks = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i) for i in range(meta.num_columns)}
    assert {chunk.compression for chunk in chunks.values()} == {"ZSTD"}
    for column in ("prob", "topk_probs.list.element", "logits.list.element"):
        assert "BYTE_STREAM_SPLIT" in chunks[column].encodings, column
    started = meta.schema.column(meta.schema.names.index("run_started_at")).logical_type
    assert json.loads(started.to_json())["timeUnit"] == "microseconds"  # Spark and Athena misread nanoseconds
    assert json.loads(started.to_json())["isAdjustedToUTC"] is True
    read = pq.read_table(pa.BufferReader(encode_shard(table, {})))
    assert set(read["run_id"].to_pylist()) == {plan.run_id}
    assert read["run_started_at"][0].value == 1714607998123456  # microseconds since the epoch, UTC


def test_a_table_without_the_run_columns_is_not_a_shard():
    plan = _plan(2, 10)
    with pytest.raises(ValueError, match="schema v3"):
        encode_shard(rows(_scored([0, 1], [None, None]), plan.paths, pa.array(NAMES)), {})
