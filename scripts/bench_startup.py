"""The run 'startup' of scripts/bench.py: where the seconds before the first batch go.

    PYTHONPATH=. python3 scripts/bench.py --only startup --json $OUT/startup.json

Small jobs (--startup-count photos, warm page cache, after one untimed job that also caches bytecode) started
--startup-runs times in two variants: plain, and under `python -X importtime`, whose lines time the end of the
imports of site (the interpreter is up), torch and torchvision. Both run with -v, so every phase is a line of the
job's own log (bench.MILESTONES), in seconds from spawn. Beside them: bare interpreters (nothing, torch,
torch and torchvision), the 10 largest imports of the job's modules, and CUDA's own start. Imported by bench.py,
which passes its job runner; nothing here needs torch at import.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from repo_env import repo_env

PHASES = {  # what each key marks, in the order a job goes through them
    "python_started_s": "interpreter up (site imported)",
    "torch_imported_s": "import torch done",
    "torchvision_imported_s": "import torchvision done",
    "prepared_s": "model built, options checked",
    "planned_s": "plan made",
    "model_on_device_s": "model on the device",
    "classifying_s": "workers started",
    "workers_first_batch_s": "first batch from the workers",
    "first_batch_s": "first batch on the device",
    "done_s": "summary logged",
    "wall_s": "process exited",
}
FIGURES = {  # durations the job itself logs under -v, in seconds
    "import_s": r"torch and torchvision imported in ([\d.]+) s",
    "prepare_s": r"the model built and the options checked in ([\d.]+) s",
    "model_to_device_s": r"the model is on \S+ after ([\d.]+) s",
    "nvjpeg_start_s": r"nvJPEG started in ([\d.]+) s",
    "first_forward_s": r"the model's first forward took ([\d.]+) s",
}
BARE = {"python": "pass", "import torch": "import torch", "import torch, torchvision": "import torch, torchvision",
        "as the job imports them": "from pipeline.imports import import_torch; import_torch()"}
JOB_MODULES = ("pipeline.cli, pipeline.runner, pipeline.prepare, pipeline.decode, pipeline.guard, pipeline.infer, "
               "pipeline.gpu_decode, pipeline.writer, pipeline.progress")  # what a job imports before its first batch
CUDA_START = """
import json, os, time
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as the job sets it
times, last = {}, time.monotonic()
def lap(name):
    global last
    now = time.monotonic()
    times[name], last = now - last, now
import torch
lap("import_torch_s")
if torch.cuda.is_available():
    torch.cuda.device_count(); lap("device_count_s")
    torch.cuda.init(); lap("cuda_init_s")
    torch.cuda.set_device(0); lap("set_device_s")
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); lap("first_tensor_s")
print(json.dumps(times))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=repo_env(), check=True)


def bare(runs: int) -> dict:
    """Seconds from spawn to exit of an interpreter that only imports, per import (median, min, max)."""
    seconds = {}
    for name, code in BARE.items():
        times = []
        for _ in range(runs):
            started = time.monotonic()
            _python("-c", code)
            times.append(time.monotonic() - started)
        seconds[name] = _spread(times)
    return seconds


def largest_imports(stderr: str, count: int = 10) -> list[dict]:
    """The count largest cumulative imports of `python -X importtime` output (nested ones included: depth 0 is
    imported by the program itself)."""
    found = []
    for line in stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            name = fields[2].rstrip()
            found.append({"module": name.strip(), "cumulative_s": int(fields[1]) / 1e6,
                          "self_s": int(fields[0]) / 1e6, "depth": (len(name) - len(name.lstrip()) - 1) // 2})
    return sorted(found, key=lambda row: -row["cumulative_s"])[:count]


def cuda_start(runs: int) -> list[dict]:
    """Each run's seconds for import torch, device_count, torch.cuda.init(), set_device and the first tensor."""
    return [json.loads(_python("-c", CUDA_START).stdout) for _ in range(runs)]


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def _figures(log: Path) -> dict:
    text = log.read_text(errors="replace")
    return {key: float(found.group(1)) for key, pattern in FIGURES.items() if (found := re.search(pattern, text))}


def startup(photos: Path, work: Path, logs: Path, job, runs: int, workers: list[str]) -> dict:
    """Phases of small jobs in seconds from spawn, each variant runs times; bare imports; CUDA's start."""
    import torch
    from synthetic import seeded_state_dict

    weights = work / "startup-resnet18.pt"  # a file, as a real job's: hashed and loaded
    torch.save(seeded_state_dict(), weights)

    def one(name: str, python: tuple[str, ...] = ()) -> dict:
        out = work / f"out-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        result = job(photos, out, logs, name, "--weights", str(weights), "-v", *workers, python=python)
        return {**result, **_figures(Path(result["log"]))}

    result: dict = {"photos": str(photos), "untimed_first": one("startup-untimed")}  # caches bytecode, pages
    variants = {"plain": (), "importtime": ("-X", "importtime")}
    jobs: dict[str, list[dict]] = {name: [] for name in variants}
    for number in range(runs):  # interleaved, so that a drift of the machine touches both alike
        for name, python in variants.items():
            jobs[name].append(one(f"startup-{name}-{number}", python))
    result["jobs"] = jobs
    result["phases"] = {name: {key: _spread(values) for key in [*PHASES, *FIGURES]
                               if (values := [one_run[key] for one_run in its_runs if one_run.get(key) is not None])}
                        for name, its_runs in jobs.items()}
    job_imports = Path(jobs["importtime"][-1]["log"]).read_text(errors="replace")
    result["job_largest_imports"] = largest_imports(job_imports)
    result["job_imports_torch_dynamo"] = re.search(r"\|\s*torch\._dynamo$", job_imports, re.M) is not None
    result["bare_s"] = bare(runs)
    as_the_job = f"{BARE['as the job imports them']}; import {JOB_MODULES}"
    result["largest_imports"] = largest_imports(_python("-X", "importtime", "-c", as_the_job).stderr)
    result["cuda_start"] = cuda_start(runs)
    return result


def print_startup(result: dict) -> None:
    """The phases as a table (median of the runs, min-max), then the imports and CUDA's start."""
    phases = result["phases"]
    print(f"\n{'start-up: seconds from spawn':<44}" + "".join(f"{name:>22}" for name in phases))
    for key, label in [*PHASES.items(), *((key, f"  ({key}, as the job logs it)") for key in FIGURES)]:
        cells = [phases[name].get(key) for name in phases]
        if any(cells):
            print(f"{label:<44}" + "".join(f"{_cell(cell):>22}" for cell in cells))
    for name, spread in result["bare_s"].items():
        print(f"bare `python -c {BARE[name]!r}`: {_cell(spread)} s")
    cuda = result["cuda_start"]
    for key in cuda[0] if cuda else []:
        print(f"CUDA start, {key}: {_cell(_spread([run[key] for run in cuda]))} s")
    print(f"the job imported torch._dynamo: {result['job_imports_torch_dynamo']}")
    print("largest imports of the job's modules (python -X importtime -c 'import ...'):")
    for row in result["largest_imports"]:
        print(f"  {row['cumulative_s']:6.2f} s  {'  ' * row['depth']}{row['module']}")


def _cell(spread: dict | None) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:.2f} ({spread['min']:.2f}-{spread['max']:.2f})"
