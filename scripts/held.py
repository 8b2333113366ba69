"""What the GPU-side scripts share: a corpus's JPEG files held in memory as the job's own Batch objects,
so no DataLoader, disk or writer is timed. The scripts import it as a sibling module."""

from __future__ import annotations

from pathlib import Path

from pipeline.decode import Batch, Sample, collate


def jpeg_files(corpus: Path, count: int) -> list[Path]:
    """The first count JPEG files under corpus, in sorted order."""
    return sorted(corpus.rglob("*.jpg"))[:count]


def held_batches(files: list[Path], batch_size: int) -> list[Batch]:
    """The files read into memory, batch_size a Batch, every file left to the GPU decoder."""
    return [collate([Sample(i, encoded=f.read_bytes()) for i, f in enumerate(files[start : start + batch_size], start)])
            for start in range(0, len(files), batch_size)]
