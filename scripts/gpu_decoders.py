#!/usr/bin/env python3
"""Batched GPU JPEG decoding, library by library: torchvision, TorchCodec and nvImageCodec (issue 5).

    PYTHONPATH=. python3 scripts/gpu_decoders.py CORPUS_DIR [--images 10240] [--libraries torchvision,torchcodec]

torchvision's decode_jpeg(list, device="cuda") holds one process-wide lock and synchronises on
every call, so a second thread cannot add decoding. TorchCodec's decode_jpeg (the library
torchvision 0.29 hands its decoders to) takes a decoder of its own per call from a cache and
synchronises the caller's current stream, so here each thread has its own stream. nvImageCodec
(NVIDIA's image codec library, `pip install nvidia-nvimgcodec-cu13 nvidia-nvjpeg`, or -cu12) has
its own CPU thread pool and can split a batch between the hardware JPEG engines and the CUDA
decoder. Each line is host-wall
images/s over all the batches, tensors on the GPU and the GPU synchronised, after a warm-up pass;
the last lines compare pixels with torchvision's.
"""

from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from held import corpus_parser, jpeg_files
from torchvision.io import ImageReadMode, decode_jpeg


def rate(name: str, images: int, run) -> None:
    try:
        run()  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        print(f"{name:<64}{images / (time.perf_counter() - started):>9.0f} img/s", flush=True)
    except Exception as error:  # one library or option missing must not hide the other lines
        print(f"{name:<64} failed: {type(error).__name__}: {error}", flush=True)


def in_threads(threads: int, batches: list, decode_batch) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode_batch, batches))


def on_own_stream(decode_batch):
    """decode_batch run on a CUDA stream of the calling thread's own, as the job's decode threads do."""
    streams = threading.local()

    def decode(batch):
        if not hasattr(streams, "stream"):
            streams.stream = torch.cuda.Stream()
        with torch.cuda.stream(streams.stream):
            return decode_batch(batch)
    return decode


def main() -> None:
    parser = corpus_parser(__doc__, images=10_240)
    parser.add_argument("--libraries", default="torchvision,torchcodec,nvimgcodec",
                        help="comma list of the libraries to time")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    files = jpeg_files(args.corpus, args.images)
    data = [f.read_bytes() for f in files]
    size, n = args.batch_size, len(data)
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    tv_batches = [tensors[i : i + size] for i in range(0, n, size)]
    torch.cuda.set_device(0)

    def torchvision_batch(batch):
        return decode_jpeg(batch, mode=ImageReadMode.RGB, device="cuda")

    if "torchvision" in args.libraries:
        rate("torchvision decode_jpeg(list), 1 thread", n, lambda: [torchvision_batch(b) for b in tv_batches])
        rate("torchvision decode_jpeg(list), 2 threads", n, lambda: in_threads(2, tv_batches, torchvision_batch))
    if "torchcodec" in args.libraries:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode_jpeg

        def torchcodec_batch(batch):
            return torchcodec_decode_jpeg(batch, mode="RGB", device="cuda")

        for threads in (1, 2, 3, 4, 6, 8):
            rate(f"torchcodec decode_jpeg(list), {threads} thread(s), a stream each", n,
                 lambda threads=threads: in_threads(threads, tv_batches, on_own_stream(torchcodec_batch)))
        compare_with_pillow(data[:size], [("torchvision", torchvision_batch(tv_batches[0])),
                                          ("torchcodec", torchcodec_batch(tv_batches[0]))])
    if "nvimgcodec" not in args.libraries:
        return

    from nvidia import nvimgcodec

    params = nvimgcodec.DecodeParams(sample_format=nvimgcodec.SampleFormat.P_RGB)
    raw_batches = [data[i : i + size] for i in range(0, n, size)]

    def nvimgcodec_decoder(threads: int, *kinds: tuple[str, float]) -> nvimgcodec.Decoder:
        backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind), load_hint=hint) for kind, hint in kinds]
        return nvimgcodec.Decoder(device_id=0, max_num_cpu_threads=threads, backends=backends or None)

    def nvimgcodec_batch(decoder: nvimgcodec.Decoder):
        def decode(batch):
            stream = torch.cuda.current_stream()
            images = decoder.decode([nvimgcodec.CodeStream(d) for d in batch], params=params,
                                    cuda_stream=stream.cuda_stream)
            return [torch.from_dlpack(image) for image in images]
        return decode

    variants = [  # name, threads submitting batches (a decoder each), nvImageCodec's CPU threads, backends
        ("all backends", 1, 8, ()),
        ("hardware engines only", 1, 4, (("HW_GPU_ONLY", 1.0),)),
        ("hardware 0.7 then CUDA decoder", 1, 15, (("HW_GPU_ONLY", 0.7), ("GPU_ONLY", 1.0))),
        ("all backends", 2, 8, ()),
        ("hardware engines only", 2, 4, (("HW_GPU_ONLY", 1.0),)),
        ("hardware engines only", 3, 4, (("HW_GPU_ONLY", 1.0),)),
        ("hardware engines only", 4, 2, (("HW_GPU_ONLY", 1.0),)),
    ]
    numbered = list(enumerate(raw_batches))
    for name, threads, cpu_threads, kinds in variants:
        try:
            decoders = [nvimgcodec_batch(nvimgcodec_decoder(cpu_threads, *kinds)) for _ in range(threads)]
        except Exception as error:
            print(f"nvImageCodec, {name}: no decoder: {error}")
            continue
        rate(f"nvImageCodec, {name}, {threads} thread(s)", n,
             lambda decoders=decoders: in_threads(len(decoders), numbered,
                                                  lambda ib: decoders[ib[0] % len(decoders)](ib[1])))

    nvimgcodec_hw = nvimgcodec_batch(nvimgcodec_decoder(4, ("HW_GPU_ONLY", 1.0)))(raw_batches[0])
    compare_with_pillow(raw_batches[0], [("torchvision", torchvision_batch(tv_batches[0])),
                                         ("nvImageCodec hardware", nvimgcodec_hw)])


def compare_with_pillow(files: list[bytes], decoded_by: list[tuple[str, list[torch.Tensor]]]) -> None:
    import io

    import numpy as np
    from PIL import Image

    pillow = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1).cuda()
              for d in files]
    for name, decoded in decoded_by:
        diffs = [(a.int() - b.int()).abs().float() for a, b in zip(pillow, decoded, strict=True) if b is not None]
        largest, mean = max(int(d.max()) for d in diffs), float(torch.stack([d.mean() for d in diffs]).mean())
        print(f"pixels vs Pillow, {name}: {len(diffs)} decoded, max |diff| {largest}, mean {mean:.4f}")

if __name__ == "__main__":
    main()
