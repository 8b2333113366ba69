"""The output as warehouses see it: real runs into Hive partitions, read by DuckDB and pyarrow.dataset,
the documented types and values, the queries of docs/queries, old and new schema versions together,
and a poller that globs OUTPUT/**/*.parquet while a run writes."""

import datetime
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.parquet import ROW_FIELDS, RUN_FIELDS, SCHEMA
from tests.conftest import REPO, make_corpus, run_pipeline

duckdb = pytest.importorskip("duckdb")
pytestmark = pytest.mark.slow  # two real runs, shared by the whole module

QUERIES = REPO / "docs" / "queries"
NIGHTS = ["2024-05-01", "2024-05-02"]
# A slow disk: each rename into place waits, so temporary files linger where a poller could trip on them.
SLOW_PUBLISH = """
import os, sys, time
from pipeline.cli import main
real_replace = os.replace
def slow_replace(src, dst):
    time.sleep(0.2)
    real_replace(src, dst)
os.replace = slow_replace
main()
"""
# The types docs/schema.md promises, as DuckDB names them.
DUCKDB_TYPES = {
    "path": "VARCHAR", "status": "VARCHAR", "error": "VARCHAR", "label": "INTEGER", "label_name": "VARCHAR",
    "prob": "FLOAT", "topk_labels": "INTEGER[]", "topk_probs": "FLOAT[]", "logits": "FLOAT[]",
    "run_id": "VARCHAR", "run_started_at": "TIMESTAMP WITH TIME ZONE", "file_size": "BIGINT",
    "file_mtime": "TIMESTAMP WITH TIME ZONE", "file_sha256": "VARCHAR", "run_date": "DATE",
}


def _poll_while_running(process, out):
    """Until the run ends, list OUTPUT the way a `**/*.parquet` glob would, hidden names included (Python's glob
    skips those, other readers may not), read every file it matches, and note the temporary files beside them."""
    seen, temps, reads = {}, set(), 0
    while True:
        running = process.poll() is None
        for folder, _, names in os.walk(out):
            temps |= {name for name in names if name.endswith(".tmp")}
            for name in fnmatch.filter(names, "*.parquet"):
                path = os.path.join(folder, name)
                if path not in seen:
                    data = open(path, "rb").read()
                    pq.read_table(pa.BufferReader(data))  # a partial file fails here
                    seen[path] = hashlib.sha256(data).hexdigest()
        if seen:  # and DuckDB's own glob and reader, as a warehouse loader polling the folder would
            duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}/**/*.parquet')").fetchall()
            reads += 1
        if not running:
            return seen, temps, reads
        time.sleep(0.01)


@pytest.fixture(scope="module")
def nights(tmp_path_factory, weights_file):
    """Two nights of the same folder: float32 logits (watched by a poller), then float16."""
    root = tmp_path_factory.mktemp("warehouse")
    paths = make_corpus(root / "in", 10)
    (root / "in" / "d1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "in" / "notes.txt").write_text("not an image")
    out = root / "out"
    common = ["--weights", str(weights_file), "--device", "cpu", "--batch-size", "4", "--shard-size", "4",
              "--workers", "0", "--max-error-rate", "0.5"]  # 1 broken file in 11 is over the default 5%
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_PUBLISH, "classify", str(root / "in"), str(out), *common,
         "--partition", f"run_date={NIGHTS[0]}"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    seen, temps, reads = _poll_while_running(process, out)
    assert process.returncode == 0, process.stderr.read()
    run_pipeline("classify", str(root / "in"), str(out), *common, "--partition", f"run_date={NIGHTS[1]}",
                 "--logits", "float16")
    manifests = [json.loads((out / f"run_date={night}" / "_SUCCESS").read_text()) for night in NIGHTS]
    return {"out": out, "paths": sorted(paths + ["d1/broken.jpg"]), "seen": seen, "temps": temps, "reads": reads,
            "manifests": manifests}


def _view(out):
    con = duckdb.connect()
    con.execute((QUERIES / "duckdb_view.sql").read_text().replace("{output}", str(out)))
    return con


def _night(out, night):
    """One night's rows as pyarrow reads its files directly, in plan order."""
    files = sorted((out / f"run_date={night}").glob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def test_a_poller_never_sees_a_temporary_or_partial_file(nights):
    out, manifest = nights["out"], nights["manifests"][0]
    assert nights["temps"], "the poller must have watched writes in progress (temporary files present)"
    assert all(name.startswith(".") for name in nights["temps"])
    assert nights["reads"] > 0
    first_night = {p: sha for p, sha in nights["seen"].items() if f"run_date={NIGHTS[0]}" in p}
    expected = {str(out / f"run_date={NIGHTS[0]}" / shard["file"]): shard["sha256"] for shard in manifest["shards"]}
    assert first_night == expected, "every file the glob showed had its final, committed bytes"


def test_duckdb_reads_the_partitions_with_the_documented_types_and_counts(nights):
    con = _view(nights["out"])
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE predictions)").fetchall())
    assert types == DUCKDB_TYPES
    counts = con.execute("SELECT run_date, count(*), count(DISTINCT path) FROM predictions GROUP BY 1 ORDER BY 1")
    assert counts.fetchall() == [(datetime.date.fromisoformat(n), 11, 11) for n in NIGHTS]
    out = nights["out"]
    plain = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{out}/**/*.parquet', hive_partitioning = true)")
    assert {name: kind for name, kind, *_ in plain.fetchall()} == DUCKDB_TYPES  # run_date: DuckDB guesses DATE
    files = [row[0] for row in con.execute(f"SELECT file FROM glob('{out}/**/*.parquet')").fetchall()]
    assert len(files) == sum(m["files"] for m in nights["manifests"]) == 6
    assert {pq.read_metadata(file).num_row_groups for file in files} == {1}, "a whole shard per row group"


def test_duckdb_values_are_the_rows_written(nights):
    out, manifest = nights["out"], nights["manifests"][0]
    con = _view(out)
    got = con.sql("SELECT * EXCLUDE (run_date) FROM predictions WHERE run_date = DATE '2024-05-01' ORDER BY path"
                  ).to_arrow_table().to_pylist()  # through Arrow: Python's TIMESTAMPTZ values would need pytz
    written = _night(out, NIGHTS[0]).to_pylist()
    assert [row["path"] for row in got] == nights["paths"] == [row["path"] for row in written]
    assert got == written  # every column, floats to the bit, timestamps with their zone
    broken = next(row for row in got if row["path"] == "d1/broken.jpg")
    assert broken["status"] == "error" and broken["error"] and broken["logits"] is None and broken["label"] is None
    ok = [row for row in got if row["status"] == "ok"]
    assert all(len(row["logits"]) == 1000 and len(row["topk_labels"]) == 5 for row in ok)
    assert {row["run_id"] for row in got} == {manifest["run"]["run_id"]}
    started = datetime.datetime.fromisoformat(manifest["run"]["created_at"])
    assert {row["run_started_at"] for row in got} == {started}


def test_float16_logits_are_the_float32_ones_rounded_and_the_rest_is_unchanged(nights):
    con = _view(nights["out"])
    night = [con.execute("SELECT label, topk_labels, logits FROM predictions WHERE run_date = ? AND status = 'ok' "
                         "ORDER BY path", [datetime.date.fromisoformat(n)]).fetchall() for n in NIGHTS]
    assert [row[:2] for row in night[0]] == [row[:2] for row in night[1]]
    full = np.array([row[2] for row in night[0]], dtype=np.float32)
    half = np.array([row[2] for row in night[1]], dtype=np.float32)
    assert np.array_equal(half, half.astype(np.float16).astype(np.float32)), "values are half-precision numbers"
    assert np.allclose(half, full.astype(np.float16).astype(np.float32), rtol=2**-10, atol=0)
    assert not np.array_equal(half, full)
    sizes = [_logits_bytes(nights["out"], night) for night in NIGHTS]
    assert sizes[1] < 0.6 * sizes[0], f"float16 must about halve the logits column (bytes {sizes})"


def _logits_bytes(out, night):
    """Compressed bytes of the logits column over a night's shards (tiny shards: the footers would dominate)."""
    total = 0
    for file in (out / f"run_date={night}").glob("part-*.parquet"):
        meta = pq.read_metadata(file).row_group(0)
        total += sum(meta.column(i).total_compressed_size for i in range(meta.num_columns)
                     if meta.column(i).path_in_schema.startswith("logits."))
    return total


def _documented_dataset(out):
    """pyarrow.dataset as docs/warehouse.md opens the output."""
    partitioning = ds.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")
    return ds.dataset(out, format="parquet", partitioning=partitioning,
                      schema=pa.schema([*SCHEMA, pa.field("run_date", pa.date32())]))


def test_pyarrow_dataset_reads_the_partitions_with_the_documented_schema(nights):
    discovered = ds.dataset(nights["out"], format="parquet", partitioning="hive")  # types from the first file
    assert discovered.schema.remove_metadata().equals(pa.schema([*SCHEMA, pa.field("run_date", pa.string())]))
    dataset = _documented_dataset(nights["out"])
    assert dataset.schema.field("logits").type == pa.list_(pa.float32())
    table = dataset.to_table(filter=ds.field("run_date") == datetime.date(2024, 5, 1)).sort_by("path")
    assert table.drop_columns(["run_date"]).to_pylist() == _night(nights["out"], NIGHTS[0]).to_pylist()
    assert dataset.count_rows() == 22


def test_the_documented_queries_run_and_count_right(nights):
    con = _view(nights["out"])
    rows = {n: _night(nights["out"], n).to_pylist() for n in NIGHTS}

    per_label = con.execute((QUERIES / "predictions_per_label_per_night.sql").read_text()).fetchall()
    expected = {}
    for night, night_rows in rows.items():
        for row in night_rows:
            if row["status"] == "ok":
                key = (datetime.date.fromisoformat(night), row["label"], row["label_name"])
                expected[key] = expected.get(key, 0) + 1
    assert {row[:3]: row[3] for row in per_label} == expected and len(per_label) == len(expected)

    errors = con.execute((QUERIES / "error_rate_per_night.sql").read_text()).fetchall()
    assert [(day, images, errors, pytest.approx(rate)) for day, images, errors, rate in errors] == [
        (datetime.date.fromisoformat(n), 11, 1, 1 / 11) for n in NIGHTS]

    image = next(row for row in rows[NIGHTS[0]] if row["status"] == "ok")
    topk = con.execute((QUERIES / "topk_for_one_image.sql").read_text(), {"path": image["path"]}).fetchall()
    first = [row for row in topk if row[0] == datetime.date(2024, 5, 1)]
    assert [(rank, label, prob) for _, _, rank, label, prob in first] == list(
        zip(range(1, 6), image["topk_labels"], image["topk_probs"], strict=True))
    assert len(topk) == 10, "one ranking per night"


def test_shards_of_schema_v1_v2_and_v3_read_together(nights, tmp_path):
    current = sorted((nights["out"] / f"run_date={NIGHTS[0]}").glob("part-*.parquet"))[0]
    new = tmp_path / "run_date=2024-05-01" / current.name
    new.parent.mkdir()
    new.write_bytes(current.read_bytes())
    v1_rows = pq.read_table(current).select([f.name for f in ROW_FIELDS])  # v1 had exactly these nine columns
    v1 = v1_rows.cast(pa.schema(ROW_FIELDS)).replace_schema_metadata({"schema_version": "1"})
    v2 = pq.read_table(current).select([f.name for f in ROW_FIELDS + RUN_FIELDS])  # v2 added the run's columns
    v2 = v2.cast(pa.schema(ROW_FIELDS + RUN_FIELDS)).replace_schema_metadata({"schema_version": "2"})
    old, older = (tmp_path / f"run_date=2024-04-{day}" / "part-00000-0123456789ab.parquet" for day in (30, 29))
    for table, path in ((v1, older), (v2, old)):
        path.parent.mkdir()
        pq.write_table(table, path)
    assert [pq.read_schema(path).metadata[b"schema_version"] for path in (older, old, new)] == [b"1", b"2", b"3"]

    table = _documented_dataset(tmp_path).to_table()
    by_night = {day: table.filter(pa.compute.equal(table["run_date"], datetime.date(2024, *day))) for day in
                ((4, 29), (4, 30), (5, 1))}
    assert [by_night[day]["run_id"].null_count for day in by_night] == [v1.num_rows, 0, 0]
    assert [by_night[day]["file_size"].null_count for day in by_night] == [v1.num_rows, v1.num_rows, 0]
    assert by_night[(4, 29)]["path"].to_pylist() == by_night[(5, 1)]["path"].to_pylist()

    con = _view(tmp_path)
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE predictions)").fetchall())
    assert types == DUCKDB_TYPES
    nulls = con.execute("SELECT run_date, count(*), count(run_id), count(file_mtime), count(logits) "
                        "FROM predictions GROUP BY 1 ORDER BY 1").fetchall()
    rows, with_logits = v1.num_rows, v1["logits"].length() - v1["logits"].null_count
    assert nulls == [(datetime.date(2024, 4, 29), rows, 0, 0, with_logits),
                     (datetime.date(2024, 4, 30), rows, rows, 0, with_logits),
                     (datetime.date(2024, 5, 1), rows, rows, rows, with_logits)]
