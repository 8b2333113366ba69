"""One-off experiment (issue 21's lever "the hardware engines versus the CUDA decoder"): nvImageCodec's decoders
(the GPU's hardware JPEG engines alone, its CUDA decoder, both) against torchvision's nvJPEG, each alone and each
beside the model on another thread, on JPEG bytes held in memory; and their pixels against Pillow's.

    pip install --no-deps --target /tmp/site .whl/nvidia_nvimgcodec_cu13-*.whl .whl/nvidia_nvjpeg-*.whl
    PYTHONPATH=.:/tmp/site python3 scripts/gpu_hw_decode.py --corpus /tmp/bench/jpeg-100000-333-800 --json $OUT/hw.json
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import warnings
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

BATCH = 256


def tv_decoder():
    def decode(batch: list[bytes], stream: torch.cuda.Stream) -> list[torch.Tensor]:
        with torch.cuda.stream(stream):
            data = [torch.frombuffer(b, dtype=torch.uint8) for b in batch]  # read only
            return decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
    return decode


def nv_decoder(kinds: list[str], options: str = ""):
    from nvidia import nvimgcodec

    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind)) for kind in kinds]
    decoder = nvimgcodec.Decoder(backends=backends, options=options)
    params = nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False)

    def decode(batch: list[bytes], stream: torch.cuda.Stream) -> list[torch.Tensor | None]:
        streams = [nvimgcodec.CodeStream(b) for b in batch]
        images = decoder.decode(streams, params=params, cuda_stream=stream.cuda_stream)
        return [None if image is None else torch.as_tensor(image, device="cuda") for image in images]
    return decode


def model_step(graph: bool = False):
    """One forward of a batch (eagerly, or replayed from a CUDA graph: the GIL held a few microseconds a batch)."""
    net = torchvision.models.resnet18().eval().cuda().half().to(memory_format=torch.channels_last)
    data = torch.randn(BATCH, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                for _ in range(3):
                    net(data)
            torch.cuda.synchronize()
            with torch.cuda.graph(captured):
                out = net(data)

    def step(stream: torch.cuda.Stream) -> int:
        with torch.cuda.stream(stream), torch.inference_mode():
            if graph:
                captured.replay()
                out.float().sum().item()
            else:
                net(data).float().sum().item()
        return BATCH
    return step


def loop(work, seconds: float, stop: threading.Event | None = None) -> dict:
    """Run work() (returns images done) until seconds pass or stop is set; images/s and failures."""
    done = failed = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds and not (stop and stop.is_set()):
        count, bad = work()
        done, failed = done + count, failed + bad
    elapsed = time.monotonic() - started
    return {"img_s": round(done / elapsed, 1), "images": done, "failed": failed}


def decode_work(decode, data: list[bytes], priority: int = 0):
    stream = torch.cuda.Stream(priority=priority)
    position = [0]

    def work():
        start = position[0] % (len(data) - BATCH)
        position[0] += BATCH
        out = decode(data[start:start + BATCH], stream)
        stream.synchronize()
        return len(out), sum(1 for image in out if image is None)
    return work


def model_work(graph: bool = False):
    step, stream = model_step(graph), torch.cuda.Stream()
    return lambda: (step(stream), 0)


def beside(decode, data: list[bytes], seconds: float, graph: bool = False, priority: int = 0) -> dict:
    """The decoder and the model on two threads at once: each one's rate."""
    results = {}
    model = model_work(graph)
    work = decode_work(decode, data, priority)
    model(), work()  # warm both
    threads = [threading.Thread(target=lambda: results.__setitem__("model", loop(model, seconds))),
               threading.Thread(target=lambda: results.__setitem__("decode", loop(work, seconds)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def two_beside(make, data: list[bytes], seconds: float) -> dict:
    """Two decode threads (a decoder each) and the model on a third: each one's rate."""
    results = {}
    model = model_work()
    works = [decode_work(make(), data) for _ in range(2)]
    model(), [work() for work in works]
    jobs = {"model": model, "decode_0": works[0], "decode_1": works[1]}
    threads = [threading.Thread(target=lambda n=name, w=work: results.__setitem__(n, loop(w, seconds)))
               for name, work in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results["decode_img_s"] = results["decode_0"]["img_s"] + results["decode_1"]["img_s"]
    return results


def pipelined(decode, data: list[bytes], seconds: float) -> dict:  # noqa: C901 - an experiment
    """Decode (and resize to 224 on the decode thread's stream) feeding the model through a queue of 2 batches:
    the images/s the model consumes, as in the job, where the model runs only as fast as batches come."""
    import queue

    import torch.nn.functional as F

    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    model_stream, decode_stream = torch.cuda.Stream(), torch.cuda.Stream()
    ready: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def producer():
        position = 0
        while not stop.is_set():
            start = position % (len(data) - BATCH)
            position += BATCH
            images = decode(data[start:start + BATCH], decode_stream)
            with torch.cuda.stream(decode_stream):
                chw = [image if image.shape[0] == 3 else image.permute(2, 0, 1) for image in images]
                batch = torch.cat([F.interpolate(image[None].float(), size=(224, 224), mode="bilinear")
                                   for image in chw])
                batch = ((batch - mean) / 58).half().contiguous(memory_format=torch.channels_last)
                event = torch.cuda.Event()
                event.record(decode_stream)
            ready.put((batch, event))

    model = torchvision.models.resnet18().eval().cuda().half().to(memory_format=torch.channels_last)
    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    for _ in range(3):  # warm both sides
        batch, event = ready.get()
        torch.cuda.current_stream().wait_event(event)
        with torch.inference_mode():
            model(batch).float().sum().item()
    done, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        batch, event = ready.get()
        model_stream.wait_event(event)
        with torch.cuda.stream(model_stream), torch.inference_mode():
            model(batch).float().sum().item()
        done += BATCH
    stop.set()
    while thread.is_alive():
        try:
            ready.get(timeout=1)
        except queue.Empty:
            pass
    return {"img_s": round(done / (time.monotonic() - started), 1)}


def pixels(decode, data: list[bytes]) -> dict:
    """Decoded pixels against Pillow's, over up to 64 photos: max and mean absolute difference in grey levels."""
    stream = torch.cuda.Stream()
    out = decode(data[:64], stream)
    stream.synchronize()
    worst, total, count = 0, 0.0, 0
    for raw, image in zip(data[:64], out, strict=True):
        if image is None:
            continue
        image = image.cpu()
        if image.shape[0] == 3:  # torchvision: CHW
            image = image.permute(1, 2, 0)
        pil = torch.from_numpy(__import__("numpy").asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy())
        diff = (image.int() - pil.int()).abs()
        worst, total, count = max(worst, int(diff.max())), total + float(diff.float().mean()), count + 1
    return {"max_abs": worst, "mean_abs": round(total / max(count, 1), 3), "compared": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    files = sorted(args.corpus.rglob("*.jpg"))[:args.count]
    data = [path.read_bytes() for path in files]
    result = {"torch": torch.__version__, "torchvision": torchvision.__version__, "photos": len(data),
              "mean_bytes": sum(map(len, data)) // len(data), "device": torch.cuda.get_device_name()}
    decoders = {"torchvision": tv_decoder}
    try:
        from nvidia import nvimgcodec
        result["nvimgcodec"] = nvimgcodec.__version__ if hasattr(nvimgcodec, "__version__") else "?"
        decoders |= {"nv_hw": lambda: nv_decoder(["HW_GPU_ONLY"]),
                     "nv_hw+cuda": lambda: nv_decoder(["HW_GPU_ONLY", "GPU_ONLY"])}
    except Exception as error:  # noqa: BLE001 - an experiment: record and go on
        result["nvimgcodec_error"] = repr(error)
    result["model_alone"] = loop(model_work(), args.seconds)

    for name, make in decoders.items():
        entry = result.setdefault("decoders", {}).setdefault(name, {})
        try:
            decode = make()
            work = decode_work(decode, data)
            work()
            entry["alone"] = loop(work, args.seconds)
            entry["pipelined"] = pipelined(decode, data, args.seconds)
            entry["pipelined_again"] = pipelined(decode, data, args.seconds)
        except Exception as error:  # noqa: BLE001
            entry["error"] = repr(error)
        print(name, json.dumps(entry), flush=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
