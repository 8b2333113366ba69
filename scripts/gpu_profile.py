#!/usr/bin/env python3
"""Where the GPU's time goes in the job's GPU side, kernel by kernel, and the resize's alternatives (issue 5).

    PYTHONPATH=. python3 scripts/gpu_profile.py CORPUS_DIR [--images 10240]

Part 1 runs decode_ahead and the model over batches held in memory under torch.profiler and prints
the device time of each kernel (and copy) per image: the sum bounds the rate when the SMs are the
limit. Part 2 times resize-and-crop variants on the same decoded images with CUDA events and
compares each with torchvision's own antialiased resize and center crop of each image in float32.
"""

from __future__ import annotations

import time
import warnings

import torch
from held import corpus_parser, first_gpu, held_corpus
from torch.profiler import ProfilerActivity, profile
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as F

from pipeline.decode import Preprocess
from pipeline.gpu_decode import GpuDecoder, decode_ahead
from pipeline.infer import Classifier
from pipeline.model import build_model, resolve_weights


def kernel_table(batches, decoder: GpuDecoder, classifier: Classifier, images: int) -> None:
    def job_side():
        with torch.inference_mode():
            for _, rows, _ in decode_ahead(iter(batches), decoder):
                classifier.forward(rows)
        torch.cuda.synchronize()

    job_side()  # warm-up
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        job_side()
    wall = time.perf_counter() - started
    host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"\nhost time per batch of {decoder.batch_size}, all threads, by self time (ms), calls per batch")
    for event in host[:25]:
        print(f"{event.self_cpu_time_total / 1e3 / len(batches):>8.2f} ms  {event.count / len(batches):>7.1f}  "
              f"{event.key[:90]}  (total {event.cpu_time_total / 1e3 / len(batches):.2f} ms)")
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"\ndevice time per image, decode_ahead + model, {images} images, wall {images / wall:,.0f} img/s "
          "under the profiler")
    for event in events[:25]:
        print(f"{event.device_time_total / images:>8.2f} us  {event.count:>7}  {event.key[:100]}")
    print(f"{total / images:>8.2f} us  total: {1e6 / (total / images):,.0f} img/s if nothing overlapped")


def reference(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """torchvision's own resize (antialiased bilinear) and center crop of one image, in float32."""
    resized = F.resize(image.float(), [preprocess.resize_size], antialias=True)
    return F.center_crop(resized, [preprocess.crop_size])


class MatmulResize:
    """Resize and crop as two matrix products per chunk of images: rows, then columns.

    Each side's weights are torch's own antialiased resize of an identity matrix (resizing is linear
    and separable), cut to the crop, cached by (length, resized length) and padded per chunk.
    """

    def __init__(self, decoder: GpuDecoder, dtype: torch.dtype):
        self.decoder, self.dtype, self.cache = decoder, dtype, {}

    def side(self, length: int, resized: int) -> torch.Tensor:
        key = (length, resized)
        if key not in self.cache:
            crop = self.decoder.preprocess.crop_size
            eye = torch.eye(length, device=self.decoder.device)[None, None]
            full = torch.nn.functional.interpolate(eye, size=(resized, length), mode="bilinear", antialias=True,
                                                   align_corners=False)[0, 0]
            start = round((resized - crop) / 2.0)
            self.cache[key] = full[start : start + crop].to(self.dtype)
        return self.cache[key]

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        p = self.decoder.preprocess
        out = torch.empty((len(images), 3, p.crop_size, p.crop_size), dtype=torch.float16, device=self.decoder.device)
        sizes = [image.shape[1:] for image in images]
        order = sorted(range(len(images)), key=lambda i: sizes[i][0] * sizes[i][1])
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            rows, cols = [], []
            for i in chunk:
                h, w = sizes[i]
                short, long = min(h, w), max(h, w)
                new_long = int(p.resize_size * long / short)
                rh, rw = (new_long, p.resize_size) if h > w else (p.resize_size, new_long)
                rows.append(self.side(h, rh))
                cols.append(self.side(w, rw).t())
            pad = torch.nested.to_padded_tensor
            x = pad(torch.nested.nested_tensor([images[i] for i in chunk]), 0).to(self.dtype)
            wy = pad(torch.nested.nested_tensor(rows), 0)
            wx = pad(torch.nested.nested_tensor(cols), 0)
            y = torch.matmul(torch.matmul(wy[:, None], x), wx[:, None])
            out[torch.tensor(chunk, device=out.device)] = y.to(out.dtype)
        return out


def main() -> None:
    parser = corpus_parser(__doc__, images=10_240)
    parser.add_argument("--kernels-only", action="store_true", help="skip the resize variants")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    files, batches = held_corpus(args)
    size = args.batch_size
    device, transforms, preprocess = first_gpu()
    decoder = GpuDecoder(device, preprocess, size, torch.float16)
    classifier = Classifier(build_model(resolve_weights("random", 0)), device, transforms.mean, transforms.std, 5,
                            torch.float16, decoder)
    kernel_table(batches, decoder, classifier, len(files))
    if args.kernels_only:
        return

    decoded = [decode_jpeg(b.jpegs(), mode=ImageReadMode.RGB, device=device) for b in batches[:8]]
    n = sum(len(d) for d in decoded)
    variants = {"roi_align (current)": decoder.resize, "matmul fp16": MatmulResize(decoder, torch.float16),
                "matmul fp32": MatmulResize(decoder, torch.float32)}
    print(f"\nresize + crop of {n} decoded images, CUDA events")
    for name, resize in variants.items():
        for d in decoded:
            resize(d)  # warm-up, and any caches
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        outs = [resize(d) for d in decoded]
        end.record()
        torch.cuda.synchronize()
        host = time.perf_counter() - host
        worst, mean = 0.0, 0.0
        for d, out in zip(decoded[:2], outs[:2], strict=True):
            for image, got in zip(d, out, strict=True):
                diff = (got.float() - reference(image, preprocess)).abs()
                worst, mean = max(worst, float(diff.max())), mean + float(diff.mean()) / (2 * len(d))
        print(f"{name:<40} device {n / (start.elapsed_time(end) / 1e3):>9,.0f} img/s  host {n / host:>9,.0f} img/s"
              f"  vs torchvision: max |diff| {worst:.2f}, mean {mean:.3f}")


if __name__ == "__main__":
    main()
