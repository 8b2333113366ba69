"""Files and folders the job's user may not read: an error row naming the cause, or a message naming the fix.

Root reads everything, and CI runs the tests as root; so as root the job runs as `nobody` through
util-linux's setpriv, and otherwise as the current user.
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import run_pipeline, write_image

NOBODY = 65534


def _unprivileged() -> list[str]:
    """The command prefix that runs a process as a user whom file permissions apply to."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): no user to whom permissions apply")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def open_dir():
    """A folder anyone may enter and write: pytest's tmp_path is its owner's alone."""
    folder = Path(tempfile.mkdtemp(prefix="pipeline-permissions-"))
    folder.chmod(0o777)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o777)  # the current user may remove what it made unreadable
    shutil.rmtree(folder)


def _classify(input_dir: Path, output_dir: Path) -> subprocess.CompletedProcess:
    return run_pipeline("classify", str(input_dir), str(output_dir), "--weights", "random", "--device", "cpu",
                        "--workers", "1", "--batch-size", "4", "--progress", "log", "--max-error-rate", "0.5",
                        env={"HOME": str(output_dir.parent)}, check=False, prefix=_unprivileged())


def test_a_file_the_user_may_not_read_is_an_error_row_and_the_others_are_classified(open_dir):
    images = open_dir / "in"
    images.mkdir()
    for i in range(3):
        write_image(images / f"{i}.jpg", i)
    (images / "1.jpg").chmod(0o000)

    result = _classify(images, open_dir / "out")

    assert result.returncode == 0, result.stderr
    rows = ds.dataset(str(open_dir / "out"), format="parquet").to_table().sort_by("path").to_pylist()
    assert [row["path"] for row in rows] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [row["status"] for row in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"] == "unreadable file: Permission denied"
    assert rows[0]["label"] is not None and rows[1]["label"] is None


def test_a_folder_the_user_may_not_list_is_logged_and_counted_and_the_others_are_classified(open_dir):
    images = open_dir / "in"
    (images / "locked").mkdir(parents=True)
    write_image(images / "a.jpg", 0)
    write_image(images / "locked" / "b.jpg", 1)
    (images / "locked").chmod(0o000)

    result = _classify(images, open_dir / "out")

    assert result.returncode == 0, result.stderr
    assert "cannot list folder locked (unreadable folder: Permission denied): its files get no rows" in result.stderr
    rows = ds.dataset(str(open_dir / "out"), format="parquet").to_table().to_pylist()
    assert [(row["path"], row["status"]) for row in rows] == [("a.jpg", "ok")]
    manifest = json.loads((open_dir / "out" / "_SUCCESS").read_text())
    assert manifest["unlisted_folders"] == {"unreadable folder": 1}


def test_an_input_the_user_may_not_list_stops_the_job_before_it_starts_naming_the_fix(open_dir):
    images = open_dir / "in"
    write_image(images / "a.jpg", 0)
    images.chmod(0o000)

    result = _classify(images, open_dir / "out")

    assert result.returncode == 2, result.stderr
    assert f"cannot list input folder {images}: make it readable by this user" in result.stderr
    assert not (open_dir / "out").exists(), "nothing is written"
