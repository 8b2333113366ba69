"""Check an output folder, finished or not: every shard whole, its rows the plan's, the plan covered exactly once."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from pipeline import parquet
from pipeline.plan import Plan
from pipeline.runfolder import MANIFEST_NAME, RunFolder, shard_name

_logger = logging.getLogger(__name__)


class Check(IntEnum):
    """What failed, as the exit code of `verify`; with several, the lowest code that applies."""

    OK = 0  # finished (_SUCCESS) and every check passed
    UNFINISHED = 10  # no damage, but not every shard is committed yet: the report says how far it is
    PLAN = 11  # no readable _plan.arrow: not an output of `pipeline classify`, or its first run never planned
    MANIFEST = 12  # _SUCCESS is unreadable or disagrees with the plan
    MISSING = 13  # a shard the manifest or a record lists does not exist
    UNREADABLE = 14  # a shard does not open as Parquet, or its path column cannot be read
    ROWS = 15  # a shard's row count or paths are not its share of the plan
    CHECKSUM = 16  # a shard's sha256 differs from the one recorded when it was committed
    COVERAGE = 17  # the plan is not covered exactly once: an extra part file, or a shard listed twice


@dataclass
class Listed:
    """A shard that the manifest or the records say is committed."""

    shard: int
    file: str
    rows: int
    sha256: str | None  # None: visible but its record not yet written (a kill between the two)


@dataclass
class Report:
    output_dir: Path
    shards: int = 0  # in the plan
    rows: int = 0  # in the plan
    committed_shards: int = 0
    committed_rows: int = 0
    finished: bool = False  # a readable _SUCCESS
    problems: list[tuple[Check, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless findings: leftovers, records a resume rebuilds

    def fail(self, check: Check, message: str) -> None:
        self.problems.append((check, message))

    @property
    def exit_code(self) -> Check:
        if self.problems:
            return min(check for check, _ in self.problems)
        return Check.OK if self.finished else Check.UNFINISHED

    def lines(self) -> list[str]:
        state = "finished (_SUCCESS)" if self.finished else "unfinished (no _SUCCESS)"
        lines = [f"{self.output_dir}: {state}, {self.committed_shards} of {self.shards} shards committed and whole "
                 f"({self.committed_rows} of {self.rows} rows)"]
        if any(check == Check.PLAN for check, _ in self.problems):
            lines = [f"{self.output_dir}: cannot be checked without its plan"]
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"problem ({check.name.lower()}): {message}" for check, message in self.problems]
        code = self.exit_code
        verdict = {Check.OK: "ok", Check.UNFINISHED: "no damage found; the run is not finished"}.get(code, "DAMAGED")
        lines.append(f"verify: {verdict} (exit {int(code)}: {code.name.lower()})")
        return lines


def _from_manifest(report: Report, plan: Plan, manifest: dict) -> list[Listed]:
    listed = [Listed(s["shard"], s["file"], s["rows"], s["sha256"]) for s in manifest.get("shards", [])]
    if manifest.get("rows") != len(plan.paths):
        report.fail(Check.MANIFEST, f"{MANIFEST_NAME} counts {manifest.get('rows')} rows, the plan {len(plan.paths)}")
    for missing in sorted(set(range(plan.shard_count)) - {entry.shard for entry in listed}):
        report.fail(Check.MANIFEST, f"{MANIFEST_NAME} does not list shard {missing}")
    return listed


def _from_records(report: Report, folder: RunFolder, plan: Plan) -> list[Listed]:
    """Committed shards of an unfinished output: by their records, or visible without one (rebuilt on resume)."""
    listed = []
    for shard in range(plan.shard_count):
        record = folder.read_record(plan, shard)
        if record is not None:
            try:
                listed.append(Listed(shard, record["file"], record["rows"], record["sha256"]))
                continue
            except KeyError as error:
                report.notes.append(f"the record of shard {shard} lacks {error}; the next run rebuilds it")
        elif folder.record_file(plan, shard).exists():
            report.notes.append(f"the record of shard {shard} is unreadable; the next run rebuilds it")
        if folder.shard_file(plan, shard).exists():
            name = shard_name(plan.run_id, shard)
            listed.append(Listed(shard, name, len(plan.shard_range(shard)), None))
            report.notes.append(f"{name} is visible without its record (killed between the two); the next run "
                                "writes the record")
    return listed


def _check_shard(report: Report, folder: RunFolder, plan: Plan, entry: Listed) -> bool:
    """Whether one listed shard is whole: exists, opens, has its share of the plan in order, and its checksum."""
    expected = plan.shard_range(entry.shard)
    name = shard_name(plan.run_id, entry.shard)
    if entry.file != name:
        report.fail(Check.MANIFEST, f"shard {entry.shard} is listed as {entry.file}, not {name}")
        return False
    try:
        data = folder.read_shard(plan, entry.shard)
    except FileNotFoundError:
        report.fail(Check.MISSING, f"{entry.file} does not exist")
        return False
    except OSError as error:
        report.fail(Check.UNREADABLE, f"{entry.file} cannot be read: {error}")
        return False
    try:
        paths = parquet.read_paths(data)
    except Exception as error:  # any Parquet or Arrow error: the file is not a readable shard
        report.fail(Check.UNREADABLE, f"{entry.file} does not open as Parquet: {error}")
        return False
    if len(paths) != len(expected) or entry.rows != len(expected):
        report.fail(Check.ROWS, f"{entry.file} has {len(paths)} rows (recorded {entry.rows}); its share of the "
                                f"plan is {len(expected)}")
        return False
    if not paths.equals(plan.paths[expected.start : expected.stop]):
        report.fail(Check.ROWS, f"{entry.file}: its rows are not the plan's files {expected.start} to "
                                f"{expected.stop - 1} in order")
        return False
    if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
        report.fail(Check.CHECKSUM, f"{entry.file}: sha256 differs from the one recorded at commit")
        return False
    return True


def verify_output(output_dir: Path) -> Report:
    """Check output_dir without changing it; safe while a run is writing it."""
    report = Report(output_dir)
    folder = RunFolder(output_dir)
    try:
        plan = folder.load_plan()
    except Exception as error:  # an Arrow error: the plan file is damaged
        report.fail(Check.PLAN, f"the plan _plan.arrow is unreadable: {error}")
        return report
    if plan is None:
        report.fail(Check.PLAN, "no _plan.arrow: not an output of `pipeline classify`, or its first run never planned")
        return report
    report.shards, report.rows = plan.shard_count, len(plan.paths)
    stray = folder.stray_data_files(plan)  # listed before the records, so a shard committed meanwhile is listed

    listed = None
    try:
        manifest = folder.read_manifest()
        if manifest is not None:
            listed, report.finished = _from_manifest(report, plan, manifest), True
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.fail(Check.MANIFEST, f"{MANIFEST_NAME} is unreadable ({error}); checking the shard records instead")
    if listed is None:
        listed = _from_records(report, folder, plan)

    seen: set[int] = set()
    for entry in listed:
        if entry.shard in seen or not 0 <= entry.shard < plan.shard_count:
            report.fail(Check.COVERAGE, f"shard {entry.shard} ({entry.file}) is listed twice or is not in the plan")
            continue
        seen.add(entry.shard)
        if _check_shard(report, folder, plan, entry):
            report.committed_shards += 1
            report.committed_rows += entry.rows
    for extra in stray:
        report.fail(Check.COVERAGE, f"{extra} is not a committed shard of this output's plan: readers would count "
                                    "its rows too (move it away)")
    temps = folder.temp_files()
    if temps:
        report.notes.append(f"{temps} temporary files of an interrupted run (invisible to readers; the next run "
                            "removes them)")
    return report
