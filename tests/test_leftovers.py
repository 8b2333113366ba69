"""Leftovers of killed runs: their hidden temp files are removed, nothing else is touched."""

from pipeline.durable import temp_name
from pipeline.leftovers import remove_temp_files


def test_temp_files_are_removed_and_published_files_kept(tmp_path):
    kept = [tmp_path / "part-00000-run.parquet", tmp_path / "_plan.arrow", tmp_path / "_shards" / "x.json",
            tmp_path / ".hidden-by-someone-else", tmp_path / "notes.tmp"]
    temps = [temp_name(tmp_path / "part-00001-run.parquet"), temp_name(tmp_path / "_SUCCESS"),
             temp_name(tmp_path / "_shards" / "part-00001-run.parquet.json"),
             tmp_path / "date=2024-01-01" / ".part-00002-run.parquet.999999.tmp"]
    for path in kept + temps:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")

    assert remove_temp_files(tmp_path) == 4

    assert all(path.exists() for path in kept) and not any(path.exists() for path in temps)


def test_only_the_named_files_temps_are_removed_when_names_are_given(tmp_path):
    mine, theirs = temp_name(tmp_path / "part-00001-run.parquet"), temp_name(tmp_path / "part-00002-run.parquet")
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")

    assert remove_temp_files(tmp_path, {"part-00001-run.parquet"}) == 1

    assert not mine.exists() and theirs.exists()
