"""Bytes per row of a shard for each --logits choice, on logits of a ResNet18 with non-trivial weights.

    python scripts/bench_logits.py [--images 1000] [--batch-size 50] [--input DIR] [--weights FILE]

Writes test-style images (tests/conftest.py), classifies them on the CPU with seeded weights whose
BatchNorm statistics are random (random-init weights give unrealistically uniform logits), or the
first --images images of --input with the --weights file (a ResNet18 state_dict), then
encodes one whole-shard Parquet file per choice exactly as the job does (pipeline.writer) and
prints a Markdown table for docs/benchmarks.md. Two formats the job does not write are measured
for comparison: float32 without BYTE_STREAM_SPLIT, and Parquet's FLOAT16 logical type.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import decode, infer, model, plan, writer  # noqa: E402
from tests.conftest import make_corpus, seeded_state_dict  # noqa: E402


def classify(root: Path, count: int, batch_size: int, weights: Path | None) -> tuple[plan.Plan, list[infer.Scored]]:
    if weights is None:
        make_corpus(root, count, size=(320, 240))
        weights = root / "weights.pt"
        torch.save(seeded_state_dict(), weights)
    paths = plan.list_images(root).paths[:count]
    count = len(paths)
    the_plan = plan.new_plan(plan.Listing(paths, 0), count, {})
    net = model.build_model(model.resolve_weights(str(weights), 0))
    transforms = model.preprocessing_transforms()
    classifier = infer.Classifier(net, torch.device("cpu"), transforms.mean, transforms.std, topk=5)
    dataset = decode.ImageFiles(root, the_plan, list(range(count)), decode.Preprocess.from_transforms(transforms))
    loader = decode.make_loader(dataset, batch_size, workers=1, pin_memory=False)
    return the_plan, list(classifier.score(loader))


def shard_table(the_plan: plan.Plan, scored: list[infer.Scored], choice: str) -> pa.Table:
    names = pa.array(model.class_names(1000, None))
    table = pa.concat_tables([writer.rows(s, the_plan.paths, names, choice) for s in scored]).combine_chunks()
    return writer.with_run_columns(table, the_plan.run_id, the_plan.facts["created_at"])


def encoded_bytes(data: bytes) -> tuple[int, int]:
    """File bytes, and the compressed bytes of the logits column chunk."""
    meta = pq.read_metadata(pa.BufferReader(data))
    columns = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
    return len(data), sum(c.total_compressed_size for c in columns if c.path_in_schema.startswith("logits"))


def other_format(table: pa.Table, logits_type: pa.DataType, split: bool) -> bytes:
    """The job's shard with another logits encoding: plain float32, or Parquet FLOAT16."""
    table = table.set_column(table.schema.get_field_index("logits"), "logits",
                             table["logits"].cast(pa.list_(logits_type)))
    sink = pa.BufferOutputStream()
    floats = ["prob", "topk_probs.list.element"] + (["logits.list.element"] if split else [])
    pq.write_table(table, sink, row_group_size=table.num_rows, compression="zstd",
                   use_dictionary=["status", "error", "label_name", "run_id", "run_started_at"],
                   column_encoding={c: "BYTE_STREAM_SPLIT" for c in floats})
    return sink.getvalue().to_pybytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--input", type=Path, help="a folder of real images (needs --weights)")
    parser.add_argument("--weights", type=Path, help="a ResNet18 state_dict with 1000 classes (needs --input)")
    args = parser.parse_args()
    if (args.input is None) != (args.weights is None):
        parser.error("--input and --weights go together")
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        the_plan, scored = classify(args.input or Path(folder), args.images, args.batch_size, args.weights)
        seconds = time.monotonic() - started
    logits = np.concatenate([s.logits for s in scored])
    print(f"{len(logits)} images classified in {seconds:.0f} s; logits mean {logits.mean():.2f}, std "
          f"{logits.std():.2f}, min {logits.min():.2f}, max {logits.max():.2f}; "
          f"top-1 classes used: {len(np.unique(logits.argmax(1)))}\n")
    half = writer.stored_logits(logits, "float16")
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top5_half = np.argsort(-half, axis=1, kind="stable")[:, :5]
    print(f"float16: max |error| {np.abs(half - logits).max():.4f}, max relative error "
          f"{(np.abs(half - logits) / np.maximum(np.abs(logits), 1e-3)).max():.5f}, argmax equal for "
          f"{(half.argmax(1) == logits.argmax(1)).mean():.1%} of rows, top-5 order equal for "
          f"{(top5 == top5_half).all(1).mean():.1%}\n")

    float32 = shard_table(the_plan, scored, "float32")
    choices = [(f"`--logits {c}`", writer.encode_shard(shard_table(the_plan, scored, c), {})) for c in
               writer.LOGITS_CHOICES]
    choices += [("float32 without BYTE_STREAM_SPLIT (not written)", other_format(float32, pa.float32(), False)),
                ("Parquet FLOAT16, plain (not written)", other_format(float32, pa.float16(), False))]
    rows = len(logits)
    print("| logits stored as | bytes per row (whole file) | logits column bytes per row |")
    print("| --- | ---: | ---: |")
    for name, data in choices:
        total, logit_bytes = encoded_bytes(data)
        print(f"| {name} | {total / rows:,.0f} | {logit_bytes / rows:,.0f} |")


if __name__ == "__main__":
    main()
