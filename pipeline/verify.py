"""Check an output folder, finished or not: every shard whole, its rows the plan's, the plan covered exactly once."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commit import MANIFEST_NAME, RECORDS_DIR, shard_name
from pipeline.durable import published_name
from pipeline.plan import Plan, load_plan

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


def _from_records(report: Report, plan: Plan) -> list[Listed]:
    """Committed shards of an unfinished output: by their records, or visible without one (rebuilt on resume)."""
    listed = []
    for shard in range(plan.shard_count):
        name = shard_name(plan, shard)
        record_path = report.output_dir / RECORDS_DIR / f"{name}.json"
        try:
            record = json.loads(record_path.read_bytes())
            listed.append(Listed(shard, record["file"], record["rows"], record["sha256"]))
            continue
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as error:
            report.notes.append(f"record {record_path.name} is unreadable ({error}); the next run rebuilds it")
        if (report.output_dir / name).exists():
            listed.append(Listed(shard, name, len(plan.shard_range(shard)), None))
            report.notes.append(f"{name} is visible without its record (killed between the two); the next run "
                                "writes the record")
    return listed


def _check_shard(report: Report, plan: Plan, entry: Listed) -> bool:
    """Whether one listed shard is whole: exists, opens, has its share of the plan in order, and its checksum."""
    path = report.output_dir / shard_name(plan, entry.shard)
    expected = plan.shard_range(entry.shard)
    if entry.file != path.name:
        report.fail(Check.MANIFEST, f"shard {entry.shard} is listed as {entry.file}, not {path.name}")
        return False
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        report.fail(Check.MISSING, f"{entry.file} does not exist")
        return False
    except OSError as error:
        report.fail(Check.UNREADABLE, f"{entry.file} cannot be read: {error}")
        return False
    try:
        paths = pq.read_table(pa.BufferReader(data), columns=["path"]).column("path").combine_chunks()
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


def _visible_part_files(output_dir: Path) -> set[str]:
    """Every Parquet file a warehouse reader would see (names under '_' or '.' folders and files are skipped)."""
    return {str(path.relative_to(output_dir)) for path in output_dir.rglob("*.parquet")
            if not any(part.startswith(("_", ".")) for part in path.relative_to(output_dir).parts)}


def verify_output(output_dir: Path) -> Report:
    """Check output_dir without changing it; safe while a run is writing it."""
    report = Report(output_dir)
    visible = _visible_part_files(output_dir)  # listed before the records, so a shard committed meanwhile is listed
    try:
        plan = load_plan(output_dir)
    except Exception as error:  # an Arrow error: the plan file is damaged
        report.fail(Check.PLAN, f"the plan _plan.arrow is unreadable: {error}")
        return report
    if plan is None:
        report.fail(Check.PLAN, "no _plan.arrow: not an output of `pipeline classify`, or its first run never planned")
        return report
    report.shards, report.rows = plan.shard_count, len(plan.paths)

    listed = None
    try:
        manifest = json.loads((output_dir / MANIFEST_NAME).read_bytes())
        listed, report.finished = _from_manifest(report, plan, manifest), True
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.fail(Check.MANIFEST, f"{MANIFEST_NAME} is unreadable ({error}); checking the shard records instead")
    if listed is None:
        listed = _from_records(report, plan)

    seen: set[int] = set()
    for entry in listed:
        if entry.shard in seen or not 0 <= entry.shard < plan.shard_count:
            report.fail(Check.COVERAGE, f"shard {entry.shard} ({entry.file}) is listed twice or is not in the plan")
            continue
        seen.add(entry.shard)
        if _check_shard(report, plan, entry):
            report.committed_shards += 1
            report.committed_rows += entry.rows
    for extra in sorted(visible - {entry.file for entry in listed}):
        report.fail(Check.COVERAGE, f"{extra} is not a committed shard of this output's plan: readers would count "
                                    "its rows too (move it away)")
    temps = sum(published_name(path.name) is not None for path in output_dir.rglob(".*.tmp"))
    if temps:
        report.notes.append(f"{temps} temporary files of an interrupted run (invisible to readers; the next run "
                            "removes them)")
    return report
