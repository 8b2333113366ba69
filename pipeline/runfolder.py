"""The run folder's one owner: the name of every file in it, what is committed and whole, and every write there.

A run folder (OUTPUT, or its partition folder) holds:
  _plan.arrow                     the plan and the run's identity (pipeline.plan), published once
  _listing.arrow                  a partitioned run's whole input listing with fingerprints (pipeline.nights),
                                  published just before the plan: the next incremental night compares with it
  part-NNNNN-RUNID.parquet        committed shards: visible means complete
  _shards/part-....parquet.json   one record per committed shard: rows, bytes, sha256, counts
  _SUCCESS                        the manifest, published last (pipeline.finish decides its content)
  _locks/NAME.lock                the writers' flocks (pipeline.lock)
  .NAME.HOST.PID.tmp              a file being published (pipeline.durable); a killed run's are removed here
No other module builds a path inside a run folder, and only this one writes or removes there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa

from pipeline import lock, parquet
from pipeline.durable import durable_publish, published_name
from pipeline.plan import Plan, read_facts, read_plan

_logger = logging.getLogger(__name__)

PLAN_NAME = "_plan.arrow"  # a leading '_' and no '.parquet': warehouse readers and table globs skip it
LISTING_NAME = "_listing.arrow"
MANIFEST_NAME = "_SUCCESS"
RECORDS_DIR = "_shards"
LOCKS_DIR = "_locks"
DAMAGED = (OSError, ValueError, KeyError, pa.ArrowException)  # what reading a damaged run file raises (unreadable,
#   not Arrow IPC or JSON, a fact missing)


def shard_name(run_id: str, shard: int) -> str:
    """Unique per run (Snowflake-style reloads stay deduplicated) and stable across resumes."""
    return f"part-{shard:05d}-{run_id}.parquet"


class RunFolder:
    """One run's folder. Reads are safe at any time; writes only under the lock that covers them."""

    def __init__(self, path: Path):
        self.path = path

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # names

    def shard_file(self, plan: Plan, shard: int) -> Path:
        return self.path / shard_name(plan.run_id, shard)

    def record_file(self, plan: Plan, shard: int) -> Path:
        return self.path / RECORDS_DIR / f"{shard_name(plan.run_id, shard)}.json"

    def lock_file(self, name: str) -> Path:
        """OUTPUT/_locks/NAME.lock (the folder is created: a lock is taken on a file that exists)."""
        (self.path / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
        return self.path / LOCKS_DIR / f"{name}.lock"

    def existing_lock_file(self, name: str) -> Path:
        """The lock file's path without creating anything (it may not exist)."""
        return self.path / LOCKS_DIR / f"{name}.lock"

    def lock_names(self, prefix: str) -> list[str]:
        """The names of the lock files that start with prefix."""
        return sorted(path.stem for path in (self.path / LOCKS_DIR).glob(f"{prefix}*.lock"))

    # the plan

    def has_plan(self) -> bool:
        return (self.path / PLAN_NAME).is_file()

    def load_plan(self) -> Plan | None:
        """The saved plan, or None when there is none yet; raises when it is damaged."""
        return read_plan(self.path / PLAN_NAME) if self.has_plan() else None

    def load_facts(self) -> dict | None:
        """The saved plan's facts without its paths; None when there is none."""
        return read_facts(self.path / PLAN_NAME) if self.has_plan() else None

    def publish_listing(self, data: bytes) -> None:
        """Publish the input listing (replacing one a run killed before its plan left); only under the plan lock."""
        durable_publish(self.path / LISTING_NAME, data)

    def listing_file(self) -> Path | None:
        """The published input listing, or None when there is none."""
        path = self.path / LISTING_NAME
        return path if path.is_file() else None

    def open_plan(self, make: Callable[[], Plan]) -> tuple[Plan, bool]:
        """The saved plan, or else make()'s, published: (plan, True when this process published it).

        However many processes open it at once, one lists and plans while the others wait on the `plan` lock, and
        exactly one plan is published (an exclusive link, which holds even where the lock only excludes processes
        of one host); all get that one."""
        saved = self.load_plan()
        if saved is not None:
            return saved, False
        with lock.acquire(self.lock_file("plan"), wait=True):
            saved = self.load_plan()
            if saved is not None:
                return saved, False
            fresh = make()
            if durable_publish(self.path / PLAN_NAME, fresh.to_bytes(), exclusive=True):
                return fresh, True
        return self.load_plan(), False

    # shards

    def commit(self, plan: Plan, shard: int, data: bytes, status_counts: dict[str, int],
               error_counts: dict[str, int]) -> dict:
        """Publish a shard (temp, fsync, rename, fsync folder), then its record; return the record."""
        durable_publish(self.shard_file(plan, shard), data)
        return self._publish_record(plan, shard, data, status_counts, error_counts)

    def _publish_record(self, plan: Plan, shard: int, data: bytes, status_counts: dict[str, int],
                        error_counts: dict[str, int]) -> dict:
        record = {
            "file": shard_name(plan.run_id, shard),
            "shard": shard,
            "rows": len(plan.shard_range(shard)),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "status_counts": status_counts,
            "error_counts": error_counts,  # error rows by cause (pipeline/causes.py)
        }
        (self.path / RECORDS_DIR).mkdir(exist_ok=True)
        durable_publish(self.record_file(plan, shard), json.dumps(record).encode())
        return record

    def read_record(self, plan: Plan, shard: int) -> dict | None:
        """A shard's record, or None when it is missing or unreadable."""
        try:
            record = json.loads(self.record_file(plan, shard).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            _logger.warning("record of shard %d is unreadable (%s)", shard, error)
            return None
        return record if isinstance(record, dict) else None

    def _is_whole(self, plan: Plan, shard: int, record: dict | None) -> bool:
        """Committed and whole, cheaply: the record is this shard's, the file has its size and its footer the
        shard's row count (`verify` also hashes every byte and reads every path)."""
        rows = len(plan.shard_range(shard))
        if record is None or record.get("shard") != shard or record.get("rows") != rows:
            return False
        path = self.shard_file(plan, shard)
        try:
            return path.stat().st_size == record.get("bytes") and parquet.footer_rows(path) == rows
        except FileNotFoundError:
            return False
        except Exception as error:  # a zeroed or overwritten footer
            _logger.warning("shard %s has an unreadable footer (%s)", path.name, error)
            return False

    def committed(self, plan: Plan, shards: Iterable[int] | None = None) -> tuple[dict[int, dict], list[int]]:
        """(records of the committed and whole shards, the shards that are not): reads only, changes nothing.
        The one answer that commit, finish, verify and errors all use."""
        records, missing = {}, []
        for shard in range(plan.shard_count) if shards is None else shards:
            record = self.read_record(plan, shard)
            if self._is_whole(plan, shard, record):
                records[shard] = record
            else:
                missing.append(shard)
        return records, missing

    def repair(self, plan: Plan, shards: list[int]) -> dict[int, dict]:
        """Before classifying these shards (under their lock): the records of those committed and whole. A shard
        visible without a readable record (a kill between the two) gets its record; a damaged one is removed, to be
        redone, and the manifest with it, since it describes bytes that will change."""
        records, missing = self.committed(plan, shards)
        for shard in missing:
            path, record_path = self.shard_file(plan, shard), self.record_file(plan, shard)
            unrecorded = path.exists() and self.read_record(plan, shard) is None  # killed between the two, or torn
            recovered = self._recover_record(plan, shard) if unrecorded else None
            if recovered is not None:
                records[shard] = recovered
                continue
            if path.exists() or record_path.exists():
                _logger.warning("shard %s is damaged or incomplete: it will be redone", path.name)
                self._invalidate_manifest()
                record_path.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        return records

    def _recover_record(self, plan: Plan, shard: int) -> dict | None:
        path = self.shard_file(plan, shard)
        try:
            data = path.read_bytes()
            rows, status_counts, error_counts = parquet.read_counts(data)
        except Exception as error:
            _logger.warning("shard %s is unreadable (%s)", path.name, error)
            return None
        if rows != len(plan.shard_range(shard)):
            return None
        record = self._publish_record(plan, shard, data, status_counts, error_counts)
        return record if self._is_whole(plan, shard, record) else None

    def read_shard(self, plan: Plan, shard: int) -> bytes:
        return self.shard_file(plan, shard).read_bytes()

    def run_facts(self, plan: Plan, shard: int) -> dict:
        """The run facts a committed shard's footer holds."""
        return parquet.read_run_facts(self.shard_file(plan, shard))

    def failed_rows(self, plan: Plan, shard: int) -> tuple[list[str], list[str]]:
        """(paths, errors) of a committed shard's error rows."""
        return parquet.read_failed(self.shard_file(plan, shard))

    def stray_data_files(self, plan: Plan) -> list[str]:
        """Parquet files a warehouse reader of this folder would read (names under '_' or '.' are skipped) that
        are not this plan's shards."""
        own = {shard_name(plan.run_id, shard) for shard in range(plan.shard_count)}
        found = []
        for folder, folders, files in os.walk(self.path):
            folders[:] = [name for name in folders if not name.startswith(("_", "."))]
            for name in files:
                relative = os.path.relpath(os.path.join(folder, name), self.path)
                if name.endswith(".parquet") and not name.startswith(("_", ".")) and relative not in own:
                    found.append(relative)
        return sorted(found)

    # the manifest

    def read_manifest(self) -> dict | None:
        """The manifest, None when there is none; raises OSError or ValueError when it is unreadable."""
        try:
            manifest = json.loads((self.path / MANIFEST_NAME).read_bytes())
        except FileNotFoundError:
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("not a manifest of this job")
        return manifest

    def is_finished(self) -> bool:
        return (self.path / MANIFEST_NAME).exists()

    def publish_manifest(self, data: bytes, replace: bool) -> bool:
        """Publish _SUCCESS: exclusively (the first publisher wins; False when one exists), or replacing one."""
        return durable_publish(self.path / MANIFEST_NAME, data, exclusive=not replace)

    def _invalidate_manifest(self) -> None:
        if self.is_finished():
            _logger.warning("removing %s: a shard it lists is redone, so it is published again at the end",
                            MANIFEST_NAME)
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)

    # what killed runs left

    def temp_files(self) -> int:
        """How many hidden temp files of unfinished publications are here (invisible to readers)."""
        count = 0
        for folder in (self.path, self.path / RECORDS_DIR):
            if folder.is_dir():
                count += sum(published_name(entry.name) is not None for entry in os.scandir(folder))
        return count

    def remove_temp_files(self, plan: Plan, shards: Iterable[int], whole_folder: bool) -> int:
        """Delete the hidden temp files that this job would have published here: of these shards and their
        records, and with whole_folder (the only writer here) the plan's and the manifest's too. Never anything
        else, and nothing below other folders. Only safe while holding the lock that covers those names."""
        names = {shard_name(plan.run_id, shard) for shard in shards}
        names |= {f"{name}.json" for name in names}
        if whole_folder:
            names |= {PLAN_NAME, LISTING_NAME, MANIFEST_NAME}
        removed = 0
        for folder in (self.path, self.path / RECORDS_DIR):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if published_name(entry.name) in names and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            _logger.info("removed %d temporary files left by an interrupted run", removed)
        return removed

