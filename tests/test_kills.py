"""Fault injection: real runs killed with SIGKILL at random moments and inside commits resume to the exact rows."""

import pytest

from scripts.kill_loop import kill_loop
from tests.conftest import make_corpus

OPTIONS = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--shard-size", "4", "--workers", "1",
           "--progress", "log"]
AIMED = ["plan-write", "shard-write", "random", "shard-rename", "record-write", "manifest-write"]


@pytest.mark.slow
def test_sigkill_anywhere_loses_nothing_and_duplicates_nothing(tmp_path):
    """The short version of `make soak`: one kill at each kind of moment, a poller reading every visible shard."""
    make_corpus(tmp_path / "in", 16, size=(40, 32))

    figures = kill_loop(tmp_path / "in", tmp_path, OPTIONS, kills=len(AIMED), seed=4, schedule=AIMED)

    assert all(figures.kills_at[point] == 1 for point in AIMED if point != "random"), figures.kills_at
    assert figures.kills >= len(AIMED) and figures.resumes >= len(AIMED)
    assert figures.temp_files_left_by_kills > 0, "kills inside a write must leave temp files for the resume to remove"
    assert figures.problems == []
    assert figures.rows_lost == 0 and figures.rows_duplicated == 0 and figures.rows_differing == 0
    assert figures.rows_expected == 16 * figures.outputs
    assert figures.unreadable_shards_seen == 0 and figures.shard_reads > 0
    assert figures.verify_failures == 0
    print(figures)
