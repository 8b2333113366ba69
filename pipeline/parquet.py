"""The output format: the schema, a scored batch as rows, a shard as Parquet bytes, and reading shards back.

The only module that knows the output is Parquet: another format is another module with these functions."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.causes import error_counts

if TYPE_CHECKING:  # infer imports torch; the schema and the layout checks must not need it
    from pipeline.infer import Scored

SCHEMA_VERSION = 3  # 1: the first nine columns; 2: added run_id and run_started_at; 3: added file_size, file_mtime,
#   file_sha256 and the status 'deleted' (docs/schema.md)

# The columns of one image's row; rows() builds these. Evolution is additive and nullable only:
# new columns go at the end, are nullable, and old columns keep their names and types.
ROW_FIELDS = [
    pa.field("path", pa.string(), nullable=False),  # relative to the input folder, '/'-separated
    pa.field("status", pa.string(), nullable=False),  # 'ok', 'error' or 'deleted' (an incremental night: the file
    #   was classified by an earlier night and is gone now; every other column of the row is null)
    pa.field("error", pa.string()),  # "<cause>: <detail>" (pipeline/causes.py); null when ok
    pa.field("label", pa.int32()),  # argmax class index; null for errors
    pa.field("label_name", pa.string()),  # the class's name
    pa.field("prob", pa.float32()),  # softmax probability of label
    pa.field("topk_labels", pa.list_(pa.int32())),  # k best class indices, best first
    pa.field("topk_probs", pa.list_(pa.float32())),  # their softmax probabilities
    pa.field("logits", pa.list_(pa.float32())),  # every class's logit, in class order; null with --logits none
]
# The columns of the run, the same in every row of a shard; with_run_columns() adds them.
RUN_FIELDS = [
    pa.field("run_id", pa.string()),  # the run that wrote the row (also in the shard's name); v2
    pa.field("run_started_at", pa.timestamp("us", tz="UTC")),  # when the run was planned, UTC; v2
]
# The file's fingerprint when INPUT was listed (pipeline/fingerprint.py), one per row; with_file_columns() adds them.
FILE_FIELDS = [
    pa.field("file_size", pa.int64()),  # bytes; v3
    pa.field("file_mtime", pa.timestamp("us", tz="UTC")),  # modification time; v3
    pa.field("file_sha256", pa.string()),  # the bytes' sha256, with --fingerprint content; null otherwise; v3
]
SCHEMA = pa.schema(ROW_FIELDS + RUN_FIELDS + FILE_FIELDS)

LOGITS_CHOICES = ("float32", "float16", "none")  # float16: rounded to half precision, stored as float32
_FLOAT_COLUMNS = ("prob", "topk_probs.list.element", "logits.list.element")
_DICTIONARY_COLUMNS = ["status", "error", "label_name", "run_id", "run_started_at"]
DELETED = "deleted"  # a row's status, and the marker in a batch's errors of an item that is a deletion


def _ok_list(values: np.ndarray, ok: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list column with values's rows at the ok positions and nulls elsewhere."""
    lengths = np.where(ok, values.shape[1], 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(~ok))


def _spread(values: np.ndarray, ok: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """values at the ok positions of a column as long as ok, nulls elsewhere."""
    full = np.zeros(len(ok), dtype=values.dtype)
    full[ok] = values
    return pa.array(full, type=value_type, mask=~ok)


def stored_logits(logits: np.ndarray, choice: str) -> np.ndarray | None:
    """The logits as --logits keeps them: float32 as they are, float16 rounded to half precision
    (still float32 in the file, so every reader reads them; beyond ±65504 they become ±inf), none: None."""
    if choice == "float32":
        return logits
    if choice == "float16":
        return logits.astype(np.float16).astype(np.float32)
    if choice == "none":
        return None
    raise ValueError(f"logits must be one of {', '.join(LOGITS_CHOICES)}, not {choice!r}")


def rows(scored: Scored, paths: pa.StringArray, names: pa.StringArray, logits: str = "float32") -> pa.Table:
    """One row per item of the batch, in plan order: the ROW_FIELDS columns."""
    batch = scored.batch
    ok = np.array([error is None for error in batch.errors], dtype=bool)
    deleted = np.array([error == DELETED for error in batch.errors], dtype=bool)
    labels = _spread(scored.topk_labels[:, 0], ok, pa.int32())
    kept = stored_logits(scored.logits, logits)
    return pa.Table.from_arrays(
        [
            paths.take(pa.array(batch.indices.numpy())),
            pa.array(np.where(ok, "ok", np.where(deleted, DELETED, "error")), type=pa.string()),
            pa.array(batch.errors, type=pa.string(), mask=deleted),
            labels,
            names.take(labels),
            _spread(scored.topk_probs[:, 0], ok, pa.float32()),
            _ok_list(scored.topk_labels, ok, pa.int32()),
            _ok_list(scored.topk_probs, ok, pa.float32()),
            _ok_list(kept, ok, pa.float32()) if kept is not None else pa.nulls(len(ok), pa.list_(pa.float32())),
        ],
        schema=pa.schema(ROW_FIELDS),
    )


def with_run_columns(table: pa.Table, run_id: str, started_at: str, files: pa.Table | None = None) -> pa.Table:
    """table with the columns beyond ROW_FIELDS appended: the run id and start time (ISO 8601) in every row
    (RUN_FIELDS), and each file's fingerprint (FILE_FIELDS) from files, the same rows in order (nulls without)."""
    started = pa.scalar(datetime.fromisoformat(started_at), type=RUN_FIELDS[1].type)
    for field, value in zip(RUN_FIELDS, [pa.scalar(run_id, pa.string()), started], strict=True):
        table = table.append_column(field, pa.repeat(value, table.num_rows))
    for field in FILE_FIELDS:
        column = files.column(field.name).cast(field.type) if files is not None else pa.nulls(table.num_rows,
                                                                                                field.type)
        table = table.append_column(field, column)
    return table


def encode_shard(table: pa.Table, run_facts: dict) -> bytes:
    """A whole shard as Parquet bytes: one row group, zstd, floats byte-stream-split, timestamps in µs."""
    if not table.schema.equals(SCHEMA):
        raise ValueError(f"a shard must have the schema v{SCHEMA_VERSION} columns, not:\n{table.schema}")
    metadata = {"schema_version": str(SCHEMA_VERSION), "pipeline.run": json.dumps(run_facts, sort_keys=True)}
    table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, table.num_rows),
        compression="zstd",
        use_dictionary=_DICTIONARY_COLUMNS,
        column_encoding={column: "BYTE_STREAM_SPLIT" for column in _FLOAT_COLUMNS},
        coerce_timestamps="us",
    )
    return sink.getvalue().to_pybytes()


def status_counts(statuses: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """How many rows have each status."""
    return {value.as_py(): count.as_py() for value, count in zip(*pc.value_counts(statuses).flatten(), strict=True)}


def counts(table: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """(rows by status, error rows by cause) of a shard's table."""
    return status_counts(table["status"]), error_counts(table["error"])


def read_counts(data: bytes) -> tuple[int, dict[str, int], dict[str, int]]:
    """(rows, rows by status, error rows by cause) of a shard's bytes; raises when they are not a readable shard."""
    table = pq.read_table(pa.BufferReader(data), columns=["status", "error"])
    return (table.num_rows, *counts(table))


def footer_rows(path: Path) -> int:
    """The row count a shard's footer states (a cheap check: the data pages are not read)."""
    return pq.read_metadata(path).num_rows


def read_paths(data: bytes) -> pa.StringArray:
    """The path column of a shard's bytes, in order."""
    return pq.read_table(pa.BufferReader(data), columns=["path"]).column("path").combine_chunks()


def read_run_facts(path: Path) -> dict:
    """The run facts a shard's footer holds (pipeline.run metadata)."""
    return json.loads(pq.read_schema(path).metadata[b"pipeline.run"])


def read_failed(path: Path) -> tuple[list[str], list[str]]:
    """(paths, errors) of a shard's error rows, in order."""
    table = pq.read_table(path, columns=["path", "error"], filters=[("status", "=", "error")])
    return table["path"].to_pylist(), table["error"].to_pylist()
