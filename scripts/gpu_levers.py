#!/usr/bin/env python3
"""The job's GPU side with one lever changed at a time, interleaved, on batches held in memory (issue 5).

    PYTHONPATH=. python3 scripts/gpu_levers.py CORPUS_DIR [--images 20480] [--repeats 3]

Each variant runs Classifier.score (decode_ahead, the model, results back on the host) over the
same batches; the variants take turns, `repeats` rounds, so drift of the machine hits them alike.
Each line also says how much of the wall time was spent inside torchvision's decode call, summed
over the decode threads (waiting for its lock included: above 100 %, one thread waited while the
other decoded). Then each variant runs once more under torch.profiler: its device time and
kernel launches per image.

Variants: "current" is the job before commit 410f8ed (each resize chunk padded as uint8, image by
image, from unpinned JPEG bytes); "pinned+float" is the job since (JPEG bytes pinned, before the
timing here as the DataLoader's pin thread does in the job; chunks padded in float32, one kernel).
Others: each of those two alone, each image first cut to the part its crop samples (crop-first),
the model's BatchNorm folded into its convolutions (torch.fx's fuse; TorchScript's
optimize_for_inference), the model under torch.compile (compiled in the warm-up, which is timed),
the model on a stream of a CUDA green context limited to N of the GPU's SMs, leaving the rest to
nvJPEG's and the resize's kernels (pinned+float+green-N; torch's beta API, whose form differs
between torch 2.11 and 2.14), the JPEGs decoded by one library on N threads (pinned+float+LIBRARY-N,
LIBRARY torchvision or torchcodec), and decode_ahead alone without the model, on two threads or one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import warnings

import numpy as np
import torch
from held import corpus_parser, first_gpu, held_corpus
from torch.profiler import ProfilerActivity, profile
from torchvision.ops import roi_align

from pipeline.gpu_decode import RESIZE_CHUNK, GpuDecoder, decode_ahead
from pipeline.infer import Classifier
from pipeline.model import build_model, resolve_weights

GREEN_CONTEXTS: list = []


def green_stream(sms: int, device: torch.device) -> torch.cuda.Stream:
    """A stream whose kernels run on `sms` SMs only (a CUDA green context)."""
    from torch.cuda.green_contexts import GreenContext

    if hasattr(GreenContext, "create"):  # torch 2.9-2.11
        context = GreenContext.create(sms, device.index)
    else:  # torch 2.14
        context = GreenContext(num_sms=sms, device_id=device.index)
    GREEN_CONTEXTS.append(context)  # alive as long as its stream is used
    stream = context.Stream()
    if not isinstance(stream, torch.cuda.Stream):  # a generic torch.Stream: the same CUDA stream, as torch.cuda's
        stream = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                                   device_type=stream.device_type)
    return stream


class VariantDecoder(GpuDecoder):
    """GpuDecoder whose resize pads in float32 (one kernel a chunk) and/or cuts each image to its crop's reach,
    and whose JPEGs TorchCodec may decode instead of torchvision, on its own number of threads."""

    def __init__(self, *args, float_pad: bool, crop_first: bool, library: str = "torchvision", threads: int = 2,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.float_pad, self.crop_first, self.library, self.threads = float_pad, crop_first, library, threads
        self.decode_seconds = 0.0  # inside the decode call (torchvision's lock held), all threads

    def _decode_all(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        started = time.perf_counter()
        try:
            if self.library == "torchcodec":  # the corpus has no file nvJPEG refuses: no file-by-file retry
                from torchcodec.decoders import decode_jpeg

                return decode_jpeg(jpegs, mode="RGB", device=self.device)
            return super()._decode_all(jpegs)
        finally:
            self.decode_seconds += time.perf_counter() - started

    def resize_into(self, out: torch.Tensor, rows: np.ndarray, images: list[torch.Tensor]) -> None:
        sizes = np.array([image.shape[1:] for image in images], dtype=np.int64).reshape(-1, 2)
        boxes = self.crop_boxes(sizes)
        if self.crop_first:  # the rows and columns roi_align can read: the box, two pixels around it
            x0 = np.maximum(np.floor(boxes[:, 0]).astype(np.int64) - 2, 0)
            y0 = np.maximum(np.floor(boxes[:, 1]).astype(np.int64) - 2, 0)
            x1 = np.minimum(np.ceil(boxes[:, 2]).astype(np.int64) + 2, sizes[:, 1])
            y1 = np.minimum(np.ceil(boxes[:, 3]).astype(np.int64) + 2, sizes[:, 0])
            images = [image[:, a:b, c:d] for image, a, b, c, d in zip(images, y0, y1, x0, x1, strict=True)]
            boxes = boxes - np.stack([x0, y0, x0, y0], axis=1)
            sizes = np.stack([y1 - y0, x1 - x0], axis=1)
        order = np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")
        in_chunk = np.arange(len(images)) % RESIZE_CHUNK
        rois = np.concatenate([in_chunk[:, None], boxes[order]], axis=1).astype(np.float32)
        rois_on_device, rows_on_device = self._on_device(rois), self._on_device(rows[order])
        for start in range(0, len(order), RESIZE_CHUNK):
            chunk = order[start : start + RESIZE_CHUNK]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nested = torch.nested.nested_tensor([images[i] for i in chunk])
                if self.float_pad:
                    padded = torch.nested.to_padded_tensor(nested.to(torch.float32), 0.0)
                else:
                    padded = torch.nested.to_padded_tensor(nested, 0).float()
            pixels = roi_align(padded, rois_on_device[start : start + len(chunk)],
                               output_size=self.preprocess.crop_size, spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True)
            out.index_copy_(0, rows_on_device[start : start + len(chunk)], pixels.to(out.dtype))


def fx_fused(net: torch.nn.Module) -> torch.nn.Module:
    from torch.fx.experimental.optimization import fuse

    return fuse(net)


def jit_optimized(net: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.optimize_for_inference(torch.jit.trace(net, example))


def main() -> None:
    parser = corpus_parser(__doc__, images=20_480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="current,pinned,float-pad,pinned+float,decode-only,pinned-decode-only,"
                        "decode-only-1-thread")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    files, batches = held_corpus(args)
    size = args.batch_size
    device, transforms, preprocess = first_gpu()
    dtype = torch.float16

    def classifier(float_pad=False, crop_first=False, model="plain", library="torchvision", threads=2) -> Classifier:
        decoder = VariantDecoder(device, preprocess, size, dtype, float_pad=float_pad, crop_first=crop_first,
                                 library=library, threads=threads)
        net = build_model(resolve_weights("random", 0))
        started = time.perf_counter()
        if model == "fx":
            net = fx_fused(net)
        made = Classifier(net, device, transforms.mean, transforms.std, 5, dtype, decoder)
        if model == "compile":  # compiled on its first call, in the warm-up below
            made.model = torch.compile(made.model)
        if model == "jit":
            example = torch.zeros((size, 3, 224, 224), dtype=dtype, device=device).to(
                memory_format=torch.channels_last)
            made.model = jit_optimized(made.model, example)
        print(f"{model:>6} model ready in {time.perf_counter() - started:.2f} s", flush=True)
        return made

    makers = {  # name: (the classifier, JPEG bytes pinned, the model run or only decode_ahead)
        "current": (lambda: classifier(), False, True),
        "pinned": (lambda: classifier(), True, True),
        "fx-fuse": (lambda: classifier(model="fx"), False, True),
        "jit": (lambda: classifier(model="jit"), False, True),
        "float-pad": (lambda: classifier(float_pad=True), False, True),
        "pinned+float": (lambda: classifier(float_pad=True), True, True),
        "crop-first": (lambda: classifier(crop_first=True), False, True),
        "crop+float": (lambda: classifier(float_pad=True, crop_first=True), False, True),
        "all-fx": (lambda: classifier(float_pad=True, crop_first=True, model="fx"), False, True),
        "pinned+float+compile": (lambda: classifier(float_pad=True, model="compile"), True, True),
        **{f"pinned+float+green-{sms}": (lambda: classifier(float_pad=True), True, True)
           for sms in (8, 96, 112, 120, 128)},
        **{f"pinned+float+{library}-{threads}": (
            lambda library=library, threads=threads: classifier(float_pad=True, library=library, threads=threads),
            True, True) for library in ("torchvision", "torchcodec") for threads in (1, 2, 3, 4, 6)},
        "decode-only": (lambda: classifier(), False, False),
        "pinned-decode-only": (lambda: classifier(), True, False),
        "decode-only-1-thread": (lambda: classifier(), False, False),
    }
    pinned = [dataclasses.replace(batch, encoded=batch.encoded.pin_memory()) for batch in batches]
    variants = {name: makers[name] for name in args.variants.split(",")}
    made = {name: maker() for name, (maker, _, _) in variants.items()}
    streams = {name: green_stream(int(name.rsplit("-", 1)[1]), device) if "green" in name else None
               for name in variants}

    def run(name: str) -> None:
        _, pin, model = variants[name]
        inputs = iter(pinned if pin else batches)
        if model:
            with torch.cuda.stream(streams[name] or torch.cuda.current_stream(device)):
                for _ in made[name].score(inputs):
                    pass
        else:
            for _ in decode_ahead(inputs, made[name].decoder, threads=1 if name.endswith("1-thread") else 2):
                pass
            torch.cuda.synchronize()

    reference = None
    for name in variants:  # warm-up (and compilation), and agreement with the first variant
        started = time.perf_counter()
        with torch.cuda.stream(streams[name] or torch.cuda.current_stream(device)):
            logits = np.concatenate([scored.logits for scored in made[name].score(iter(batches[:4]))])
        print(f"{name:<20} warm-up {time.perf_counter() - started:.1f} s", flush=True)
        reference = logits if reference is None else reference
        cosine = (logits * reference).sum(1) / np.linalg.norm(logits, axis=1) / np.linalg.norm(reference, axis=1)
        print(f"{name:<20} logits vs {next(iter(variants))}: cosine min {cosine.min():.6f}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    decode_share: dict[str, list[float]] = {name: [] for name in variants}
    decode_ms: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            made[name].decoder.decode_seconds = 0.0
            started = time.perf_counter()
            run(name)
            wall = time.perf_counter() - started
            rates[name].append(len(files) / wall)
            decode_share[name].append(made[name].decoder.decode_seconds / wall)
            decode_ms[name].append(made[name].decoder.decode_seconds / len(batches) * 1e3)
    for name in variants:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(name)
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
        device_us = sum(e.device_time_total for e in kernels) / len(files)
        launches = sum(e.count for e in kernels) / len(batches)
        spread = ", ".join(f"{rate:,.0f}" for rate in rates[name])
        share, call_ms = statistics.median(decode_share[name]), statistics.median(decode_ms[name])
        print(f"{name:<20} {statistics.median(rates[name]):>8,.0f} img/s ({spread})  decode call "
              f"{share:4.0%} of wall, {call_ms:5.1f} ms a batch;  device "
              f"{device_us:6.2f} us/img, {launches:5.0f} kernels+copies a batch", flush=True)

if __name__ == "__main__":
    main()
