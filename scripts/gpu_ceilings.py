#!/usr/bin/env python3
"""The GPU's ceilings for this job, stage by stage, timed with CUDA events (medians of repeats).

    PYTHONPATH=. python3 scripts/gpu_ceilings.py CORPUS_DIR

ResNet18 forward at batch 256 (fp32, fp16 + channels_last), batched nvJPEG decoding of real
corpus files, and the job's resize + crop on the device: the numbers the job should live near.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.models import resnet18

from pipeline.decode import Preprocess
from pipeline.gpu_decode import GpuDecoder
from pipeline.model import preprocessing_transforms


def timed(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    n = args.batch_size
    rows = []
    model = resnet18().cuda().eval()
    x = torch.randn(n, 3, 224, 224, device="cuda")
    with torch.inference_mode():
        rows.append(("forward fp32", n / timed(lambda: model(x))))
        half = model.half().to(memory_format=torch.channels_last)
        xh = x.half().contiguous(memory_format=torch.channels_last)
        rows.append(("forward fp16 channels_last", n / timed(lambda: half(xh))))
        bf = resnet18().cuda().eval().bfloat16().to(memory_format=torch.channels_last)
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        rows.append(("forward bf16 channels_last", n / timed(lambda: bf(xb))))

    files = sorted(args.corpus.rglob("*.jpg"))[:n]
    encoded = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    pinned = [e.pin_memory() for e in encoded]
    rows.append(("nvJPEG batched decode", n / timed(lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB,
                                                                             device="cuda"), repeats=10)))
    rows.append(("nvJPEG batched decode, pinned", n / timed(lambda: decode_jpeg(pinned, mode=ImageReadMode.RGB,
                                                                                     device="cuda"), repeats=10)))
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    decoder = GpuDecoder(torch.device("cuda"), Preprocess.from_transforms(preprocessing_transforms()), n,
                         torch.float16)
    rows.append(("resize + crop, roi_align batch", n / timed(lambda: decoder.resize(decoded), repeats=10)))
    host = time.perf_counter()
    for _ in range(5):
        decoder.resize(decoded)
    torch.cuda.synchronize()
    rows.append(("resize + crop, host wall", 5 * n / (time.perf_counter() - host)))

    def nested_pad():
        return torch.nested.to_padded_tensor(torch.nested.nested_tensor(decoded[:64]), 0)

    rows.append(("pad 64 images, nested to_padded_tensor", 64 / timed(nested_pad, repeats=10)))
    from pipeline.decode import Sample, collate
    batch = collate([Sample(i, encoded=f.read_bytes()) for i, f in enumerate(files)]).pin_memory()
    host = time.perf_counter()
    for _ in range(5):
        decoder.images(batch)
    torch.cuda.synchronize()
    rows.append(("GpuDecoder.images (decode+resize+assemble), host wall", 5 * n / (time.perf_counter() - host)))

    print(f"\n{'stage (batch ' + str(n) + ')':<42}{'images/s':>10}")
    for name, rate in rows:
        print(f"{name:<42}{rate:>10.0f}")


if __name__ == "__main__":
    main()
