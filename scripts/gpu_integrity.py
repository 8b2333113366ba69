#!/usr/bin/env python3
"""Does every row of a full-speed GPU run carry its own image's logits? (issue 5: "never mislabels a row")

    PYTHONPATH=. python3 scripts/gpu_integrity.py CORPUS_DIR [--runs 2] [--code DIR] [--json OUT.json]

The GPU path overlaps work of several CUDA streams (two decode threads, nvJPEG's own stream, the
model's stream) and reuses freed device memory between them. A missing wait would let one batch's
pixels be overwritten before they are read: no error, only wrong logits. This runs the job at full
speed `--runs` times and once more as a reference with CUDA_LAUNCH_BLOCKING=1, where every kernel
and copy finishes before the host goes on, so no two streams' work overlaps. Seeded weights with
non-trivial BatchNorm statistics make logits depend on every pixel. Each full-speed row is compared
with the reference row of the same path: the same pixels give a logit cosine of about 1 (fp16 on
the same kernels); any row below --min-cosine, or with another label, is named. --code runs the
pipeline package of another folder (`git archive REV pipeline | tar -x -C DIR`) instead of this
checkout's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
from repo_env import REPO, repo_env
from synthetic import seeded_state_dict


def start(code: Path, *args: str, env: dict[str, str] | None = None, **options) -> subprocess.Popen:
    """Python running code's pipeline package: started in code's folder, since `python -m` puts its working folder
    first on sys.path, ahead of PYTHONPATH (started anywhere else, it would run that folder's package)."""
    return subprocess.Popen([sys.executable, *args], cwd=code, env=repo_env(code, **(env or {})), text=True, **options)


def imported_from(code: Path) -> Path:
    """The folder of the pipeline package that a run started by start(code) imports."""
    out, _ = start(code, "-c", "import pipeline; print(pipeline.__file__)", stdout=subprocess.PIPE).communicate()
    return Path(out.strip()).resolve().parent


def classify(code: Path, corpus: Path, out: Path, weights: Path, device: str, log: Path, **env: str) -> float:
    """One run of code's pipeline, started by start(code)."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.monotonic()
    with open(log, "w") as stream:
        process = start(code, "-m", "pipeline", "classify", str(corpus), str(out), "--weights", str(weights),
                        "--device", device, "--progress", "log", env=env, stdout=stream,
                        stderr=subprocess.STDOUT)
        if process.wait():
            sys.exit(f"the run failed (exit {process.returncode}): see {log}")
    return time.monotonic() - started


def rows(out: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    table = ds.dataset(str(out), format="parquet").to_table(columns=["path", "status", "label", "logits"])
    table = table.sort_by("path")
    assert set(table["status"].to_pylist()) == {"ok"}, "the corpus has only good files"
    return table["path"].to_pylist(), np.array(table["label"].to_pylist()), np.array(table["logits"].to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--runs", type=int, default=2, help="full-speed runs, each checked against the reference")
    parser.add_argument("--min-cosine", type=float, default=0.9999)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-integrity"))
    parser.add_argument("--device", default="cuda", help="cpu only to try the script on a machine without a GPU")
    parser.add_argument("--code", type=Path, default=REPO, help="a folder holding the pipeline package to run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_integrity.py needs CUDA (--device cpu only tries the script on a machine without a GPU)")
    args.work.mkdir(parents=True, exist_ok=True)
    code = args.code.resolve()
    if imported_from(code) != code / "pipeline":
        sys.exit(f"runs in {code} would not import {code / 'pipeline'}")
    print(f"runs of {code / 'pipeline'}", flush=True)
    weights = args.work / "seeded.pt"
    torch.save(seeded_state_dict(), weights)
    seconds = classify(code, args.corpus, args.work / "reference", weights, args.device, args.work / "reference.log",
                       CUDA_LAUNCH_BLOCKING="1")
    paths, labels, logits = rows(args.work / "reference")
    print(f"reference (CUDA_LAUNCH_BLOCKING=1): {len(paths)} rows in {seconds:.1f} s", flush=True)
    results = []
    for run in range(args.runs):
        out = args.work / f"fast-{run}"
        seconds = classify(code, args.corpus, out, weights, args.device, args.work / f"fast-{run}.log")
        fast_paths, fast_labels, fast_logits = rows(out)
        assert fast_paths == paths, "both runs have one row per file"
        cosine = (fast_logits * logits).sum(1) / np.linalg.norm(fast_logits, axis=1) / np.linalg.norm(logits, axis=1)
        bad = np.flatnonzero((cosine < args.min_cosine) | (fast_labels != labels))
        result = {"run": run, "rows": len(paths), "seconds": seconds, "cosine_min": float(cosine.min()),
                  "cosine_median": float(np.median(cosine)),
                  "rows_below_min_cosine": int((cosine < args.min_cosine).sum()),
                  "labels_differing": int((fast_labels != labels).sum()),
                  "worst": [(paths[i], float(cosine[i])) for i in bad[np.argsort(cosine[bad])][:10]]}
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    clean = all(r["rows_below_min_cosine"] == 0 and r["labels_differing"] == 0 for r in results)
    print(f"\n{'every row matches the reference' if clean else 'ROWS DIFFER from the reference'} "
          f"over {args.runs} full-speed run(s) of {len(paths)} images")
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
