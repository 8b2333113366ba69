"""Partitions and the output folder: names every reader accepts, one layout per OUTPUT, no twin runs."""

from pathlib import Path

import pytest

from pipeline import runner
from pipeline.config import Config
from pipeline.layout import LayoutError, check_layout, parse_partitions
from pipeline.plan import new_plan
from pipeline.prepare import prepare
from pipeline.runfolder import MANIFEST_NAME, RunFolder
from pipeline.source import Listing, LocalFolder
from tests.conftest import make_corpus, run_pipeline


def test_partitions_parse_in_order():
    assert parse_partitions(["run_date=2024-05-01", "model=resnet18.v2_1"]) == (
        ("run_date", "2024-05-01"), ("model", "resnet18.v2_1"))
    assert Config(Path("in"), Path("out"), partition=(("run_date", "2024-05-01"), ("k", "v"))).run_dir.as_posix() == (
        "out/run_date=2024-05-01/k=v")


@pytest.mark.parametrize("text, message", [
    ("run_date", "write it as key=value"),
    ("Run_Date=1", "lower-case letters"),
    ("_hidden=1", "lower-case letters"),
    ("run date=1", "lower-case letters"),
    ("label=cat", "already a column"),
    ("run_date=", "the value must be"),
    ("run_date=2024/05/01", "the value must be"),
    ("run_date=a=b", "the value must be"),
    ("run_date=.hidden", "the value must be"),
    ("run_date=..", "the value must be"),
    ("run_date=50%", "the value must be"),
    ("run_date=a b", "the value must be"),
    ("run_date=x" + "y" * 200, "at most 128"),
])
def test_bad_partitions_are_refused_with_the_fix(text, message):
    with pytest.raises(LayoutError, match=message):
        parse_partitions([text])


def test_a_key_given_twice_is_refused():
    with pytest.raises(LayoutError, match="repeat a key"):
        parse_partitions(["run_date=1", "run_date=2"])


def test_the_command_line_refuses_a_bad_partition_before_any_work(tmp_path):
    result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / "out"), "--partition", "run_date=a/b",
                          check=False, timeout=60)
    assert result.returncode == 2 and "the value must be letters" in result.stderr
    assert not (tmp_path / "out").exists()


def test_one_output_holds_one_layout(tmp_path):
    (tmp_path / "_plan.arrow").write_bytes(b"")  # an unpartitioned run
    with pytest.raises(LayoutError, match="holds an unpartitioned run"):
        check_layout(tmp_path, (("run_date", "1"),))
    check_layout(tmp_path, ())

    partitioned = tmp_path / "p"
    (partitioned / "run_date=2024-05-01").mkdir(parents=True)
    (partitioned / "_shards").mkdir()  # names with a leading '_' are not partitions
    check_layout(partitioned, (("run_date", "2024-05-02"),))
    with pytest.raises(LayoutError, match="holds partitions by run_date: pass --partition run_date=VALUE"):
        check_layout(partitioned, ())
    with pytest.raises(LayoutError, match="is partitioned by run_date, not day"):
        check_layout(partitioned, (("day", "1"),))


def _save_run(folder, input_dir, finished):
    """A plan as the runner would have saved it for `--weights random` on input_dir."""
    identity = prepare(Config(input_dir, folder, weights="random", workers=0), LocalFolder(input_dir)).identity
    folder.mkdir(parents=True)
    RunFolder(folder).open_plan(lambda: new_plan(Listing(["a.png"], 0), 10, identity))
    if finished:
        (folder / MANIFEST_NAME).write_text("{}")
    return RunFolder(folder).load_facts()["run_id"]


def test_an_unfinished_run_of_the_same_input_in_another_partition_is_not_started_twice(tmp_path):
    make_corpus(tmp_path / "in", 1)
    out = tmp_path / "out"
    run_id = _save_run(out / "run_date=2024-05-01", tmp_path / "in", finished=False)
    _save_run(out / "run_date=2024-04-30", tmp_path / "in", finished=True)  # finished runs are fine
    _save_run(out / "run_date=2024-04-29", tmp_path, finished=False)  # so is another input

    config = Config(tmp_path / "in", out, weights="random", workers=0, partition=(("run_date", "2024-05-02"),))
    with pytest.raises(LayoutError, match=rf"unfinished run of the same input and model \(run id {run_id}\): "
                                          r"resume it with --partition run_date=2024-05-01"):
        runner.run(config)
    assert not (out / "run_date=2024-05-02" / "_plan.arrow").exists()
