#!/usr/bin/env python3
"""Does a second process add GPU work on one GPU? Decoding and model loops in 1-3 processes at once (issue 5).

    PYTHONPATH=. python3 scripts/gpu_procs.py CORPUS_DIR [--images 10240] [--seconds 8]

torchvision's nvJPEG call holds one lock per process across its host work and its stream
synchronisation, so threads in one process take turns. Each line starts the named processes
(spawned, so each has its own CUDA context), lets them warm up, starts them together and counts
what each does in the same window: `decode` is GpuDecoder's decode_ahead (nvJPEG, resize, crop;
two threads), `model` is ResNet18 fp16 channels_last on batches already on the GPU, `decode+model`
is both in one process, as in the job. The files are read into memory first: no disk, no workers.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import time
import warnings
from pathlib import Path

from held import corpus_parser, jpeg_files

KINDS = ("decode", "model", "decode+model")


def worker(kind: str, files: list[Path], batch_size: int, seconds: float, barrier, results) -> None:
    warnings.simplefilter("ignore")
    import torch
    from held import held_batches

    from pipeline.decode import Preprocess
    from pipeline.gpu_decode import GpuDecoder, decode_ahead
    from pipeline.infer import Classifier
    from pipeline.model import build_model, preprocessing_transforms, resolve_weights

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    transforms = preprocessing_transforms()
    decoder = GpuDecoder(device, Preprocess.from_transforms(transforms), batch_size, torch.float16)
    classifier = Classifier(build_model(resolve_weights("random", 0)), device, transforms.mean, transforms.std, 5,
                            torch.float16, decoder)
    batches = held_batches(files, batch_size)
    zeros = torch.zeros((batch_size, 3, 224, 224), dtype=torch.float16, device=device)

    def until(deadline: float):
        for batch in itertools.cycle(batches):
            if time.monotonic() > deadline:
                return
            yield batch

    def run(deadline: float) -> int:
        done = 0
        with torch.inference_mode():
            if kind == "model":
                while time.monotonic() < deadline:
                    classifier.forward(zeros)
                    done += batch_size
                    if done % (8 * batch_size) == 0:
                        torch.cuda.synchronize()
            else:
                for _, images, count in decode_ahead(until(deadline), decoder):
                    if kind == "decode+model":
                        classifier.forward(images)
                    done += count
        torch.cuda.synchronize()
        return done

    run(time.monotonic() + 2)  # warm-up: nvJPEG, kernels, the allocator
    barrier.wait()
    started = time.monotonic()
    done = run(started + seconds)
    results.put((kind, done / (time.monotonic() - started)))


def measure(kinds: list[str], files: list[Path], batch_size: int, seconds: float) -> None:
    spawn = mp.get_context("spawn")
    barrier, results = spawn.Barrier(len(kinds)), spawn.Queue()
    processes = [spawn.Process(target=worker, args=(kind, files, batch_size, seconds, barrier, results))
                 for kind in kinds]
    for process in processes:
        process.start()
    rates = sorted(results.get(timeout=300) for _ in processes)
    for process in processes:
        process.join()
    parts = ", ".join(f"{kind} {rate:,.0f}" for kind, rate in rates)
    decoded = sum(rate for kind, rate in rates if kind != "model")
    print(f"{' | '.join(kinds):<40} decoded {decoded:>8,.0f} img/s   ({parts})", flush=True)


def main() -> None:
    parser = corpus_parser(__doc__, images=10_240)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--sets", default="decode;decode,decode;decode,decode,decode;model;decode+model;"
                        "decode+model,decode+model;model,decode;model,decode,decode;decode+model,decode",
                        help="semicolon-separated sets of processes run together, each a comma list of "
                        + "/".join(KINDS))
    args = parser.parse_args()
    files = jpeg_files(args.corpus, args.images)
    for kinds in args.sets.split(";"):
        measure(kinds.split(","), files, args.batch_size, args.seconds)


if __name__ == "__main__":
    main()
