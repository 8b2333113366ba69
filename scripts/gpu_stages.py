#!/usr/bin/env python3
"""Host-wall throughput of the job's GPU side, one stage added at a time, on real corpus batches (issue 5).

    PYTHONPATH=. python3 scripts/gpu_stages.py CORPUS_DIR [--images 20000]

The files are read into memory first and collated into the job's own Batch objects, so no
DataLoader, disk or writer is involved: what is left is nvJPEG, the resize, the model and the
threads that overlap them. Each line is images/s over all the batches, after one warm-up pass.
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch
from held import corpus_parser, first_gpu, held_corpus
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline import gpu_decode, guard
from pipeline.config import default_workers
from pipeline.decode import ImageFiles
from pipeline.gpu_decode import GpuDecoder, decode_ahead
from pipeline.infer import Classifier
from pipeline.model import build_model, resolve_weights
from pipeline.plan import list_images, new_plan


def rate(name: str, images: int, run) -> None:
    run()  # warm-up: nvJPEG state, cudnn, the allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    print(f"{name:<58}{images / (time.perf_counter() - started):>9.0f} img/s", flush=True)


def main() -> None:
    parser = corpus_parser(__doc__, images=20_000)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    files, batches = held_corpus(args)
    n, size = len(files), args.batch_size
    device, transforms, preprocess = first_gpu()
    decoder = GpuDecoder(device, preprocess, size, torch.float16)

    def decode_only():
        for batch in batches:
            decode_jpeg(batch.jpegs(), mode=ImageReadMode.RGB, device=device)

    def decode_resize():
        for batch in batches:
            decoder.resize(decode_jpeg(batch.jpegs(), mode=ImageReadMode.RGB, device=device))

    def images_one_thread():
        for batch in batches:
            decoder.images(batch)

    def ahead(threads: int):
        def run():
            for _ in decode_ahead(iter(batches), decoder, threads=threads):
                pass
        return run

    rate("nvJPEG decode_jpeg(list), one thread", n, decode_only)
    rate("decode + resize, one thread", n, decode_resize)
    rate("GpuDecoder.images, one thread", n, images_one_thread)
    for threads in (1, 2, 3):
        rate(f"decode_ahead, {threads} thread(s)", n, ahead(threads))
    for chunk in (16, 64, 32):
        gpu_decode.RESIZE_CHUNK = chunk
        rate(f"decode_ahead, 2 threads, resize chunk {chunk}", n, ahead(2))
    gpu_decode.RESIZE_CHUNK = 32
    plan = new_plan(list_images(args.corpus), 10_000, {})
    dataset = ImageFiles(args.corpus, plan, list(range(min(len(plan.paths), 4 * n))), preprocess, gpu_jpeg=True)

    def from_workers(copy: bool):
        def run():
            loaded = guard.batches(dataset, size, default_workers(), pin_memory=True)
            if copy:  # fault the shared-memory pages in here, outside the nvJPEG call
                loaded = (dataclasses.replace(b, encoded=b.encoded.clone()) for b in loaded)
            for _ in decode_ahead(loaded, decoder):
                pass
        return run

    rate("DataLoader workers -> decode_ahead (4x the images)", len(dataset), from_workers(False))
    rate("same, JPEG bytes copied out of shared memory first", len(dataset), from_workers(True))
    net = build_model(resolve_weights("random", 0))
    classifier = Classifier(net, device, transforms.mean, transforms.std, 5, torch.float16, decoder)
    rate("decode_ahead + model, results on the host", n, lambda: all(True for _ in classifier.score(iter(batches))))

if __name__ == "__main__":
    main()
