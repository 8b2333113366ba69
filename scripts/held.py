"""What the GPU-side scripts share: a corpus's JPEG files held in memory as the job's own Batch objects,
so no DataLoader, disk or writer is timed, and the GPU set up as the job sets it up. The scripts import it
as a sibling module."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.decode import Batch, Preprocess, Sample, collate
from pipeline.model import preprocessing_transforms


def corpus_parser(description: str, images: int) -> argparse.ArgumentParser:
    """A script's argument parser with what every one of them takes: the corpus, how many of its
    JPEGs, and the batch size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--batch-size", type=int, default=256)
    return parser


def jpeg_files(corpus: Path, count: int) -> list[Path]:
    """The first count JPEG files under corpus, in sorted order."""
    return sorted(corpus.rglob("*.jpg"))[:count]


def held_batches(files: list[Path], batch_size: int) -> list[Batch]:
    """The files read into memory, batch_size a Batch, every file left to the GPU decoder."""
    return [collate([Sample(i, encoded=f.read_bytes()) for i, f in enumerate(files[start : start + batch_size], start)])
            for start in range(0, len(files), batch_size)]


def held_corpus(args: argparse.Namespace) -> tuple[list[Path], list[Batch]]:
    """What corpus_parser's arguments name: the JPEG files, and them held in memory as batches."""
    files = jpeg_files(args.corpus, args.images)
    return files, held_batches(files, args.batch_size)


def first_gpu() -> tuple[torch.device, object, Preprocess]:
    """GPU 0, made the current device; the weights' transforms and the sizes the job reads off them."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    transforms = preprocessing_transforms()
    return device, transforms, Preprocess.from_transforms(transforms)
