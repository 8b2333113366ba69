#!/usr/bin/env python3
"""Object-store benchmark (issue 20): images/s read from a local S3 API server with 0 ms and 30 ms added per request.

    python scripts/bench_s3.py --images 300 --latencies 0 30 --fetch-threads 1 16

Starts moto_server on 127.0.0.1 and, in this process, a TCP proxy in front of it that holds every chunk a client
sends for the latency before passing it on (so each GET costs at least that much, as a real store's does); uploads
JPEGs of ImageNet-like size, then for each latency and --fetch-threads value measures, with the job's own DataLoader
(pipeline.decode.ImageFiles over the object-store source, --workers processes) and no model: (1) fetching alone (the
bytes handed over undecoded, as for the GPU decoder); (2) fetching and decoding; then (3) the whole job,
`python -m pipeline classify s3://... OUT` on the CPU, its img/s line.
Needs the s3 extra and moto[server] (pip install -e '.[dev,s3]').
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from repo_env import REPO, repo_env
from synthetic import write_image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_proxy(port: int, target: int, latency: dict) -> None:
    """A localhost TCP proxy to target, on its own thread; client data waits latency['s'] before it is forwarded."""

    async def pipe(reader, writer, delay: bool):
        try:
            while data := await reader.read(65536):
                if delay and latency["s"]:
                    await asyncio.sleep(latency["s"])
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_reader, server_writer, True), pipe(server_reader, client_writer, False))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()


def read_stage(url: str, threads: int, workers: int, batch_size: int, decode_images: bool = True) -> float:
    """Images/s of the job's reading and decoding alone; without decode_images, fetching alone (the workers hand
    the JPEG bytes over, as they do for the GPU decoder)."""
    from torchvision.models import ResNet18_Weights

    from pipeline import decode
    from pipeline.plan import new_plan
    from pipeline.remote import ObjectStore

    source = ObjectStore(url, threads)
    plan = new_plan(source.list(), 10_000, {})
    preprocess = decode.Preprocess.from_transforms(ResNet18_Weights.IMAGENET1K_V1.transforms())
    dataset = decode.ImageFiles(source, plan, list(range(len(plan.paths))), preprocess, batch_size=batch_size,
                                 gpu_jpeg=not decode_images)
    started, count = time.monotonic(), 0
    for batch in decode.make_loader(dataset, batch_size, workers, pin_memory=False):
        assert not any(batch.errors), batch.errors
        count += len(batch.errors)
    return count / (time.monotonic() - started)


def whole_job(url: str, threads: int, workers: int, batch_size: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([sys.executable, "-m", "pipeline", "classify", url, out, "--weights", "random",
                                 "--device", "cpu", "--workers", str(workers), "--batch-size", str(batch_size),
                                 "--fetch-threads", str(threads), "--progress", "log"],
                                env=repo_env(**env), capture_output=True, text=True, check=True)
    return float(re.search(r" img/s=([\d.]+)", result.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 30], help="ms added to each request")
    parser.add_argument("--fetch-threads", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-job", action="store_true", help="the read stage only")
    args = parser.parse_args()

    moto, proxy = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{moto}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        latency = {"s": 0.0}
        start_proxy(proxy, moto, latency)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy}", "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto}")
        client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as folder:
            for i in range(args.images):
                path = write_image(Path(folder) / f"{i:05d}.jpg", i, size=(500, 375), quality=90)
                client.upload_fileobj(io.BytesIO(path.read_bytes()), "bench", f"photos/{i:05d}.jpg")
        url = "s3://bench/photos/"
        print(f"{args.images} JPEGs 500x375, {args.workers} workers, batch {args.batch_size}", flush=True)
        print("| added latency | --fetch-threads | fetch only img/s | fetch + decode img/s | whole job img/s |")
        print("| --- | --- | --- | --- | --- |")
        for ms in args.latencies:
            latency["s"] = ms / 1000
            for threads in args.fetch_threads:
                fetch = read_stage(url, threads, args.workers, args.batch_size, decode_images=False)
                read = read_stage(url, threads, args.workers, args.batch_size)
                job = "-" if args.no_job else f"{whole_job(url, threads, args.workers, args.batch_size, env):.1f}"
                print(f"| {ms:g} ms | {threads} | {fetch:.1f} | {read:.1f} | {job} |", flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
