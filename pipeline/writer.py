"""Buffer scored rows into whole shards, and encode and commit each on background threads."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import parquet
from pipeline.config import default_workers
from pipeline.plan import Plan
from pipeline.runfolder import RunFolder

if TYPE_CHECKING:
    from pipeline.infer import Scored


def _encoder_threads() -> int:
    """Parquet encoding runs ~20k rows/s a thread (zstd, 1000 logits a row): enough threads to outpace a GPU."""
    return max(1, min(4, default_workers() // 4))


class ShardWriter:
    """Buffers rows until a shard is whole, then encodes and commits it on background threads."""

    def __init__(self, folder: RunFolder, plan: Plan, names: list[str], run_facts: dict, logits: str = "float32"):
        self.folder = folder
        self.plan = plan
        self.names = pa.array(names, type=pa.string())
        self.run_facts = run_facts
        self.logits = logits
        self.shard: int | None = None
        self.pieces: list[pa.Table] = []
        self.buffered = 0
        self.committed: dict[int, dict] = {}
        self._parallel = _encoder_threads()
        self._threads = ThreadPoolExecutor(max_workers=self._parallel, thread_name_prefix="shard-writer")
        self._commits: deque[Future] = deque()

    def add(self, scored: Scored) -> None:
        """Rows of one scored batch; a batch may end one shard and start the next."""
        table = parquet.rows(scored, self.plan.paths, self.names, self.logits)
        shards = scored.batch.indices.numpy() // self.plan.shard_size
        cuts = np.flatnonzero(np.diff(shards)) + 1
        for start, stop in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(shards)]]), strict=True):
            self._append(int(shards[start]), table.slice(start, stop - start))

    def _append(self, shard: int, piece: pa.Table) -> None:
        if shard != self.shard:
            if self.buffered:
                raise RuntimeError(f"shard {self.shard} left incomplete before shard {shard} began")
            self.shard = shard
        self.pieces.append(piece)
        self.buffered += piece.num_rows
        if self.buffered == len(self.plan.shard_range(shard)):
            self._flush()

    def _flush(self) -> None:
        table = pa.concat_tables(self.pieces).combine_chunks()
        start = self.plan.shard_range(self.shard).start
        files = self.plan.files.slice(start, table.num_rows) if self.plan.files is not None else None
        table = parquet.with_run_columns(table, self.plan.run_id, self.plan.facts["created_at"], files)
        expected = self.plan.paths[start:][: table.num_rows]
        if not table.column("path").chunk(0).equals(expected):
            raise RuntimeError(f"shard {self.shard}: rows are not in plan order; refusing to commit it")
        lengths = pc.unique(pc.list_value_length(table["logits"]).drop_null()).to_pylist()
        if lengths not in ([], [len(self.names)]):  # Parquet has no fixed-size list: the length is ours to keep
            raise RuntimeError(f"shard {self.shard}: logits of lengths {lengths}, not {len(self.names)} (one per "
                               "class); refusing to commit it")
        while len(self._commits) >= self._parallel:  # bounded memory; errors surface promptly
            self._commits.popleft().result()
        self._commits.append(self._threads.submit(self._encode_and_commit, self.shard, table))
        self.pieces, self.buffered = [], 0

    def _encode_and_commit(self, shard: int, table: pa.Table) -> None:
        data = parquet.encode_shard(table, self.run_facts)
        self.committed[shard] = self.folder.commit(self.plan, shard, data, *parquet.counts(table))

    def wait(self) -> None:
        """Block until the shards in flight are committed; re-raise the first error."""
        while self._commits:
            self._commits.popleft().result()

    def close(self) -> None:
        """Commit what is in flight and stop the thread; rows of an unfinished shard are dropped."""
        try:
            self.wait()
        finally:
            self._threads.shutdown(wait=True)
