"""The order of a run: every check that needs no model run comes before anything is written in OUTPUT, and a busy
OUTPUT is refused before torch is imported. Real processes, as cron would start them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_pipeline, seeded_state_dict

CPU = ["--device", "cpu", "--workers", "0"]


def _tree(folder: Path) -> list[str]:
    """Every name under folder (what a run wrote there)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "two-classes.pt"
    torch.save(seeded_state_dict(num_classes=2), path)
    return path


def _bad_weights(folder: Path, kind: str) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00\xd3" * 211)
    else:  # a real weights file cut short, as an interrupted copy leaves it
        torch.save(seeded_state_dict(), folder / "whole.pt")
        path.write_bytes((folder / "whole.pt").read_bytes()[:100_000])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["garbage-weights", "truncated-weights", "topk-above-classes", "cuda-without-gpu",
                                  "labels-do-not-match", "seed-out-of-range"])
def test_what_can_be_checked_without_the_model_running_is_refused_before_anything_is_written(
        case, six_images, two_classes, tmp_path):
    """Each of these used to fail after _plan.arrow was written, so the corrected command was then refused for
    good. Now: exit 2, a message naming the fix, and OUTPUT not even created."""
    if case == "cuda-without-gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    out = tmp_path / "out"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    args, says = {
        "garbage-weights": (["--weights", str(_bad_weights(tmp_path, "garbage"))], "cannot be read as a PyTorch file"),
        "truncated-weights": (["--weights", str(_bad_weights(tmp_path, "truncated"))], "cannot be read as a PyTorch"),
        "topk-above-classes": (["--weights", str(two_classes), "--labels", str(labels.with_name("two.txt"))],
                               "--topk 2 or less"),
        "cuda-without-gpu": (["--weights", "random", "--device", "cuda"], "no CUDA GPU is visible"),
        "labels-do-not-match": (["--weights", str(two_classes), "--labels", str(labels)], "has 3 names"),
        "seed-out-of-range": (["--weights", "random", "--seed", str(2**64)], "--seed"),
    }[case]
    labels.with_name("two.txt").write_text("cat\ndog\n")
    cpu = [] if case == "cuda-without-gpu" else ["--device", "cpu"]
    result = run_pipeline("classify", str(six_images), str(out), *args, *cpu, "--workers", "0", check=False)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_after_a_refusal_the_corrected_command_runs_on_the_same_output(six_images, two_classes, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    common = ["--weights", str(two_classes), "--labels", str(tmp_path / "two.txt"), *CPU]
    assert run_pipeline("classify", str(six_images), str(out), *common, check=False).returncode == 2
    run_pipeline("classify", str(six_images), str(out), *common, "--topk", "2")
    assert run_pipeline("verify", str(out)).returncode == 0


@pytest.mark.parametrize("case", ["output-is-a-file", "output-under-a-file", "output-not-utf8"])
def test_an_output_that_cannot_be_a_folder_is_refused_with_the_fix(case, six_images, tmp_path):
    """These ended in a traceback (exit 1), or, for a non-UTF-8 name, committed a shard and then failed on every
    resume."""
    (tmp_path / "a-file").write_text("not a folder")
    out = {"output-is-a-file": tmp_path / "a-file", "output-under-a-file": tmp_path / "a-file" / "out",
           "output-not-utf8": Path(os.fsdecode(bytes(tmp_path / "out") + b"-\xff"))}[case]
    result = run_pipeline("classify", str(six_images), os.fsdecode(out), "--weights", "random", *CPU, check=False)
    assert result.returncode == 2, result.stderr
    assert {"output-is-a-file": "is a file, not a folder", "output-under-a-file": "is not a folder, so OUTPUT",
            "output-not-utf8": "is not valid UTF-8"}[case] in result.stderr
    assert "Traceback" not in result.stderr
    assert _tree(tmp_path) == ["a-file"]


def test_an_output_on_a_read_only_filesystem_is_refused_before_anything_is_written(six_images, tmp_path):
    """A read-only mount of its own, in a user and mount namespace (no privilege needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux)")
    mount = tmp_path / "ro"
    mount.mkdir()
    script = (f"mount -t tmpfs -o ro none {mount} || exit 99; "
              f"exec {sys.executable} -m pipeline classify {six_images} {mount}/out --weights random --device cpu")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode == 99:
        pytest.skip(f"cannot mount in a user namespace here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert "read-only filesystem" in result.stderr and "Traceback" not in result.stderr


def test_an_output_this_user_cannot_write_is_refused_before_anything_is_written(six_images, tmp_path):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permissions do not apply")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    shared = Path(tempfile.mkdtemp(prefix="pipeline-order-"))  # pytest's tmp_path is its owner's alone
    try:
        shared.chmod(0o755)
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        readable = shared / "six_images"
        shutil.copytree(six_images, readable)
        for path in [readable, *readable.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        result = run_pipeline("classify", str(readable), str(locked / "out"), "--weights", "random", *CPU,
                              check=False, prefix=prefix)
        assert result.returncode == 2, result.stderr
        assert "no write permission" in result.stderr and "Traceback" not in result.stderr
        assert _tree(locked) == []
    finally:
        shutil.rmtree(shared)


def test_a_busy_output_is_refused_before_torch_is_imported(six_images, tmp_path):
    """A second run on an OUTPUT another process is writing used to import torch first (3-10 s). The refusal
    now comes before any heavy import: Python's own import log shows torch was never imported."""
    out = tmp_path / "out"
    (out / "_locks").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '_locks' / 'output.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "classify", str(six_images),
                                 str(out), "--weights", "random", "--device", "cpu"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
        seconds = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 73, result.stderr
    assert "is being written by" in result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "pipeline.runner" in imported
    assert "torch" not in imported
    print(f"refused in {seconds:.2f} s")
