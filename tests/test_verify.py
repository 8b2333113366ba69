"""`verify`: every damage is found and named by its own exit code; an unfinished output reports its progress."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.durable import temp_name
from pipeline.finish import manifest
from pipeline.parquet import encode_shard, rows, with_run_columns
from pipeline.plan import new_plan
from pipeline.runfolder import MANIFEST_NAME, RunFolder, shard_name
from pipeline.source import Listing
from pipeline.verify import Check, verify_output
from tests.conftest import make_corpus, run_pipeline
from tests.test_parquet import NAMES, _scored
from tests.test_runfolder import _commit_all


def finished_output(out, images=7, shard_size=3):
    out.mkdir()
    plan = new_plan(Listing([f"d/{i:02d}.png" for i in range(images)], 0), shard_size, {"input_dir": "in"})
    folder = RunFolder(out)
    folder.open_plan(lambda: plan)
    _commit_all(out, plan)
    folder.publish_manifest(manifest(plan, folder.repair(plan, list(range(plan.shard_count))), {}), replace=True)
    return plan


def problems(report):
    return [check for check, _ in report.problems]


def test_a_whole_finished_output_passes(tmp_path):
    finished_output(tmp_path / "out")
    report = verify_output(tmp_path / "out")
    assert report.exit_code == Check.OK and report.problems == []
    assert (report.committed_shards, report.shards, report.committed_rows, report.rows) == (3, 3, 7, 7)
    assert report.lines()[-1] == "verify: ok (exit 0: ok)"


def test_an_unfinished_output_reports_progress_and_no_damage(tmp_path):
    plan = finished_output(tmp_path / "out")
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    (tmp_path / "out" / shard_name(plan.run_id, 2)).unlink()
    (tmp_path / "out" / "_shards" / f"{shard_name(plan.run_id, 2)}.json").unlink()
    (tmp_path / "out" / "_shards" / f"{shard_name(plan.run_id, 1)}.json").unlink()  # killed between shard and record
    temp_name(tmp_path / "out" / shard_name(plan.run_id, 2)).write_bytes(b"half a shard")

    report = verify_output(tmp_path / "out")

    assert report.exit_code == Check.UNFINISHED and report.problems == []
    assert (report.committed_shards, report.committed_rows) == (2, 6)
    assert "unfinished (no _SUCCESS), 2 of 3 shards committed and whole (6 of 7 rows)" in report.lines()[0]
    assert any("without its record" in note for note in report.notes)
    assert any("1 temporary files" in note for note in report.notes)


def damage_missing(out, plan):
    (out / shard_name(plan.run_id, 1)).unlink()


def damage_truncated(out, plan):
    path = out / shard_name(plan.run_id, 1)
    path.write_bytes(path.read_bytes()[:-200])


def shard_bytes(plan, shard, run_facts):
    table = rows(_scored(list(plan.shard_range(shard)), [None] * 3), plan.paths, pa.array(NAMES))
    return encode_shard(with_run_columns(table, plan.run_id, plan.facts["created_at"]), run_facts)


def damage_other_rows(out, plan):  # a valid shard holding shard 0's rows under shard 1's name
    (out / shard_name(plan.run_id, 1)).write_bytes(shard_bytes(plan, 0, {}))


def damage_checksum(out, plan):  # the right rows, other values: only the sha256 can tell
    (out / shard_name(plan.run_id, 1)).write_bytes(shard_bytes(plan, 1, {"another": "run"}))


def damage_extra_file(out, plan):
    shutil.copy(out / shard_name(plan.run_id, 1), out / "part-00001-0123456789ab.parquet")


def damage_listed_twice(out, plan):
    published = json.loads((out / MANIFEST_NAME).read_text())
    published["shards"].append(published["shards"][0])
    (out / MANIFEST_NAME).write_text(json.dumps(published))


def damage_manifest(out, plan):
    (out / MANIFEST_NAME).write_text('{"shards": [')


def damage_plan(out, plan):
    (out / "_plan.arrow").write_bytes(b"ARROW1 nothing more")


@pytest.mark.parametrize(("damage", "check"), [
    (damage_missing, Check.MISSING), (damage_truncated, Check.UNREADABLE), (damage_other_rows, Check.ROWS),
    (damage_checksum, Check.CHECKSUM), (damage_extra_file, Check.COVERAGE), (damage_listed_twice, Check.COVERAGE),
    (damage_manifest, Check.MANIFEST), (damage_plan, Check.PLAN),
])
def test_each_damage_fails_its_own_check(tmp_path, damage, check):
    plan = finished_output(tmp_path / "out")
    damage(tmp_path / "out", plan)

    report = verify_output(tmp_path / "out")

    assert problems(report) == [check], report.lines()
    assert report.exit_code == check and report.lines()[-1].startswith(f"verify: DAMAGED (exit {int(check)}")


def test_damage_in_an_unfinished_output_is_found_through_the_records(tmp_path):
    plan = finished_output(tmp_path / "out")
    (tmp_path / "out" / MANIFEST_NAME).unlink()
    damage_checksum(tmp_path / "out", plan)
    damage_extra_file(tmp_path / "out", plan)

    report = verify_output(tmp_path / "out")

    assert problems(report) == [Check.CHECKSUM, Check.COVERAGE] and report.exit_code == Check.CHECKSUM
    assert not report.finished and report.committed_shards == 2


def test_the_command_prints_the_report_and_exits_with_the_check(tmp_path):
    plan = finished_output(tmp_path / "out")
    damage_truncated(tmp_path / "out", plan)

    result = run_pipeline("verify", str(tmp_path / "out"), check=False)

    assert result.returncode == Check.UNREADABLE
    assert f"problem (unreadable): {shard_name(plan.run_id, 1)} does not open as Parquet" in result.stdout
    assert run_pipeline("verify", str(tmp_path / "nowhere"), check=False).returncode == 2


@pytest.mark.slow
def test_damaged_shards_are_found_by_verify_and_redone_by_the_next_run(tmp_path):
    make_corpus(tmp_path / "in", 12, size=(40, 32))
    args = ["classify", str(tmp_path / "in"), str(tmp_path / "out"), "--weights", "random", "--shard-size", "4",
            "--batch-size", "4", "--workers", "1"]
    run_pipeline(*args)
    out = tmp_path / "out"
    before = {path.name: pq.read_table(path) for path in out.glob("*.parquet")}
    first, second, third = sorted(before)
    truncated, zeroed = out / first, out / third
    truncated.write_bytes(truncated.read_bytes()[:5000])  # a machine crash cut it short
    zeroed.write_bytes(zeroed.read_bytes()[:-100] + bytes(100))  # same size, its footer zeroed
    untouched = (out / second).stat().st_mtime_ns

    found = verify_output(out)
    assert [check for check, _ in found.problems] == [Check.UNREADABLE, Check.UNREADABLE], found.lines()
    assert all(name in " ".join(found.lines()) for name in (first, third))

    rerun = run_pipeline(*args)

    assert "will be redone" in rerun.stderr and "classifying 8 images (2 shards)" in rerun.stderr
    assert (out / second).stat().st_mtime_ns == untouched
    assert {path.name: pq.read_table(path) for path in out.glob("*.parquet")} == before
    assert verify_output(out).exit_code == Check.OK
