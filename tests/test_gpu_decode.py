"""The GPU decode path, run on the CPU device (same code, torchvision's CPU decoder): it must agree
with the Pillow path, route what nvJPEG cannot take to Pillow, and fail one file alone."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights
from torchvision.transforms.functional import _compute_resized_output_size

from pipeline import gpu_decode
from pipeline.decode import GPU_MAX_PIXELS, ImageFiles, Preprocess, Sample, collate, decode_file, gpu_jpeg_shape
from pipeline.gpu_decode import GpuDecoder, decode_groups, resize_chunks
from pipeline.infer import Classifier, default_allocator_settings
from pipeline.model import load
from pipeline.plan import new_plan
from pipeline.source import LocalFolder
from tests.conftest import make_corpus, run_pipeline, write_image
from tests.test_hostile import slow_jpeg

TRANSFORMS = ResNet18_Weights.IMAGENET1K_V1.transforms()
PREPROCESS = Preprocess.from_transforms(TRANSFORMS)


def _samples(folder, gpu_jpeg):
    plan = new_plan(LocalFolder(folder).list(), 100, {})
    dataset = ImageFiles(LocalFolder(folder), plan, list(range(len(plan.paths))), PREPROCESS, gpu_jpeg=gpu_jpeg)
    return plan, [dataset[i] for i in range(len(dataset))]


def _batch(folder, gpu_jpeg):
    plan, samples = _samples(folder, gpu_jpeg)
    return plan, collate(samples)


def test_only_plain_upright_complete_jpegs_are_left_to_the_gpu(tmp_path):
    plain = write_image(tmp_path / "plain.jpg", 0, size=(120, 90)).read_bytes()
    grey = write_image(tmp_path / "grey.jpg", 1, mode="L").read_bytes()
    cmyk = write_image(tmp_path / "cmyk.jpg", 2, mode="CMYK").read_bytes()
    png = write_image(tmp_path / "a.png", 3).read_bytes()
    rotated = Image.new("RGB", (40, 30))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "rotated.jpg", exif=exif)

    assert gpu_jpeg_shape(plain) == (90, 120) and gpu_jpeg_shape(grey) == (72, 96), "(height, width)"
    assert gpu_jpeg_shape(plain[: len(plain) // 2]) is None, "a truncated JPEG goes to Pillow, which reports it"
    assert gpu_jpeg_shape(cmyk) is None and gpu_jpeg_shape(png) is None
    assert gpu_jpeg_shape((tmp_path / "rotated.jpg").read_bytes()) is None
    progressive = write_image(tmp_path / "progressive.jpg", 4, size=(120, 90), progressive=True).read_bytes()
    slow_jpeg(tmp_path / "slow.jpg", side=1024, scans=100)
    assert gpu_jpeg_shape(progressive) == (90, 120), "an encoder's handful of scans"
    assert gpu_jpeg_shape((tmp_path / "slow.jpg").read_bytes()) is None, "a pile of scans goes where the time limit is"


def test_gpu_path_images_agree_with_pillow_and_bad_files_fail_alone(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.jpg", i, size=(300 + 37 * i, 200 + 11 * i), quality=90)
    write_image(tmp_path / "4.png", 4, size=(250, 250))
    good = (tmp_path / "0.jpg").read_bytes()
    plan, routed = _batch(tmp_path, gpu_jpeg=True)
    assert routed.encoded_at == [0, 1, 2, 3] and routed.decoded_at == [4]
    samples = [Sample(position, encoded=data.numpy().tobytes(), encoded_shape=shape)
               for position, data, shape in zip(routed.encoded_at, routed.jpegs(), routed.encoded_shapes, strict=True)]
    samples.append(Sample(4, image=routed.images[0]))
    garbage = good[:200] + bytes(len(good) - 202) + b"\xff\xd9"  # JPEG start and end, nothing decodable between
    batch = collate([*samples, Sample(5, encoded=garbage)])  # handed to the GPU decoder whatever Pillow thinks
    assert batch.encoded_at == [0, 1, 2, 3, 5] and batch.decoded_at == [4]

    images, count = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=8, dtype=torch.float32).images(batch)

    assert images.shape == (8, 3, 224, 224) and images.dtype == torch.float32
    assert batch.errors[:5] == [None] * 5 and batch.errors[5] is not None, "only the garbage file fails"
    assert count == 5 and not images[5:].any()
    for row, name in enumerate(plan.paths.to_pylist()[:5]):
        pillow = decode_file(tmp_path / name, PREPROCESS).float()
        assert (images[row] - pillow).abs().mean() < 2.0, name  # area sampling vs Pillow's bilinear filter


def test_gpu_path_logits_match_the_cpu_fp32_path(tmp_path, weights_file):
    for i in range(6):
        write_image(tmp_path / f"{i}.jpg", 10 + i, size=(320 + 29 * i, 240), quality=92)
    loaded = load("resnet18", str(weights_file), seed=0, labels=None)
    model, classes = loaded.net, loaded.classes
    reference = Classifier(model, torch.device("cpu"), TRANSFORMS.mean, TRANSFORMS.std, topk=5, classes=classes)
    gpu_path = Classifier(model, torch.device("cpu"), TRANSFORMS.mean, TRANSFORMS.std, topk=5,
                          decoder=GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=8, dtype=torch.float32),
                          classes=classes)

    expected = next(reference.score([_batch(tmp_path, gpu_jpeg=False)[1]])).logits
    got = next(gpu_path.score([_batch(tmp_path, gpu_jpeg=True)[1]])).logits

    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert got.shape == expected.shape == (6, 1000)
    assert cosine.min() >= 0.999, cosine
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 5 / 6


def test_a_batch_with_nothing_for_the_gpu_decoder_passes_through(tmp_path):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    _, batch = _batch(tmp_path, gpu_jpeg=True)

    images, count = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=4, dtype=torch.float32).images(batch)

    assert count == 1 and batch.errors[0] is None and batch.errors[1] is not None
    assert torch.equal(images[0], decode_file(tmp_path / "a.png", PREPROCESS).float())


def test_crop_boxes_are_the_weights_resize_then_center_crop_in_source_coordinates():
    sizes = [(375, 500), (500, 375), (333, 333), (257, 1000), (1000, 257), (481, 799), (224, 225), (2000, 3)]
    boxes = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=8, dtype=torch.float32).crop_boxes(np.array(sizes))

    for (height, width), box in zip(sizes, boxes, strict=True):  # the scalar recipe, torchvision's own functions
        resized_h, resized_w = _compute_resized_output_size((height, width), [PREPROCESS.resize_size])
        top = int(round((resized_h - PREPROCESS.crop_size) / 2.0))
        left = int(round((resized_w - PREPROCESS.crop_size) / 2.0))
        sy, sx = resized_h / height, resized_w / width
        expected = [left / sx, top / sy, (left + PREPROCESS.crop_size) / sx, (top + PREPROCESS.crop_size) / sy]
        np.testing.assert_allclose(box, expected, rtol=1e-12, err_msg=f"{height}x{width}")


def test_resize_keeps_each_image_in_its_place_across_chunks(monkeypatch):
    monkeypatch.setattr("pipeline.gpu_decode.RESIZE_CHUNK", 3)  # several chunks, each padded to its own size
    generator = torch.Generator().manual_seed(0)
    sizes = [(300, 260), (240, 400), (230, 230), (500, 250), (260, 300), (5, 40), (256, 256), (333, 281), (7, 7)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    decoder = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=8, dtype=torch.float32)

    together = decoder.resize(images)

    assert together.shape == (len(images), 3, 224, 224)
    for row, image in enumerate(images):  # alone: no padding, no sorting; a side under 8 pixels would read padding
        assert torch.equal(together[row], decoder.resize([image])[0]), f"image {row} {sizes[row]}"
    assert not torch.equal(together[0], together[4]), "different images give different rows"


def test_big_photos_decoded_in_groups_and_resized_in_chunks_give_the_same_rows(tmp_path, monkeypatch):
    sizes = [(200, 300), (3000, 2000), (240, 320), (2000, 3000), (333, 250), (40, 5), (480, 640)]  # (width, height)
    for i, size in enumerate(sizes):
        write_image(tmp_path / f"{i}.jpg", i, size=size, quality=85)
    write_image(tmp_path / "7.png", 7, size=(200, 150))  # decoded by the worker
    plan, samples = _samples(tmp_path, gpu_jpeg=True)
    good = (tmp_path / "0.jpg").read_bytes()
    garbage = Sample(99, encoded=good[:200] + bytes(len(good) - 202) + b"\xff\xd9")  # no shape read: counts as
    #   GPU_MAX_PIXELS; nvJPEG and Pillow both refuse it, in a middle group
    batch = collate([*samples[:3], garbage, *samples[3:]])
    assert batch.decoded_at == [8] and batch.encoded_shapes[1] == (2000, 3000) and batch.encoded_shapes[3] is None
    decoder = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=16, dtype=torch.float32)
    calls = {"nvjpeg": 0, "roi_align": 0}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(decoder, "_nvjpeg", counted("nvjpeg", decoder._nvjpeg))
    monkeypatch.setattr(gpu_decode, "roi_align", counted("roi_align", gpu_decode.roi_align))

    def decode(decode_pixels, resize_pixels):
        monkeypatch.setattr(gpu_decode, "DECODE_PIXELS", decode_pixels)
        monkeypatch.setattr(gpu_decode, "RESIZE_PIXELS", resize_pixels)
        calls.update(nvjpeg=0, roi_align=0)
        fresh = dataclasses.replace(batch, errors=list(batch.errors))  # images() writes the errors it finds
        rows, count = decoder.images(fresh)
        return rows, count, fresh.errors, dict(calls)

    whole, whole_count, whole_errors, whole_calls = decode(10**12, 10**12)
    grouped, count, errors, grouped_calls = decode(1_000_000, 2_000_000)

    assert torch.equal(grouped, whole), "the same pixels in the same rows"
    assert count == whole_count == 8 and errors == whole_errors and errors[3] is not None
    assert whole_calls == {"nvjpeg": 1 + 8, "roi_align": 2}, "one call for the batch, then file by file for the garbage"
    assert grouped_calls["nvjpeg"] == 6 + 1, "each big photo, the garbage and the small ones alone: 6 groups"
    assert grouped_calls["roi_align"] == 6, "one per group, and the 5-pixel-high photo alone"
    pillow = torch.stack([decode_file(tmp_path / name, PREPROCESS).float() for name in plan.paths.to_pylist()])
    distances = (grouped[:8, None] - pillow[None]).abs().mean(dim=(2, 3, 4))
    assert distances.argmin(1).tolist() == list(range(8)), "each row is its own file's; the garbage's went to the next"


def test_decode_groups_stay_within_the_pixel_budget_but_for_one_larger_image(monkeypatch):
    monkeypatch.setattr(gpu_decode, "DECODE_PIXELS", 10_000)
    rng = np.random.default_rng(0)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 150, (300, 2))] + [None, (1, 1)]
    pixels = [shape[0] * shape[1] if shape else GPU_MAX_PIXELS for shape in shapes]

    groups = decode_groups(shapes)

    assert [i for group in groups for i in range(len(shapes))[group]] == list(range(len(shapes))), "in order, once"
    assert any(sum(pixels[group]) > 10_000 for group in groups), "some images are larger than the budget"
    for group, after in zip(groups, [*groups[1:], None], strict=True):
        assert sum(pixels[group]) <= 10_000 or group.stop - group.start == 1, group
        if after is not None:
            assert sum(pixels[group.start:after.start + 1]) > 10_000, "not cut before the budget is spent"
    monkeypatch.setattr(gpu_decode, "DECODE_PIXELS", 128_000_000)
    assert decode_groups([(500, 375)] * 256) == [slice(0, 256)], "an ImageNet-sized batch stays one nvJPEG call"
    assert decode_groups([]) == []


def test_resize_chunks_stay_within_the_padded_pixel_budget(monkeypatch):
    monkeypatch.setattr(gpu_decode, "RESIZE_PIXELS", 2_000_000)
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(8, 1500, (200, 2)), [[5, 40], [3000, 2000], [2000, 3000]]])
    sizes = sizes[np.argsort(sizes[:, 0] * sizes[:, 1], kind="stable")]
    boxes = GpuDecoder(torch.device("cpu"), PREPROCESS, batch_size=8, dtype=torch.float32).crop_boxes(sizes)

    chunks = resize_chunks(sizes, boxes)

    assert [i for start, end in chunks for i in range(start, end)] == list(range(len(sizes)))
    for start, end in chunks:
        padded = (end - start) * sizes[start:end, 0].max() * sizes[start:end, 1].max()
        assert end - start <= gpu_decode.RESIZE_CHUNK and (padded <= 2_000_000 or end - start == 1), (start, end)
    assert any(end - start == 1 and sizes[start].tolist() == [5, 40] for start, end in chunks), "a 5-pixel side alone"
    monkeypatch.setattr(gpu_decode, "RESIZE_PIXELS", 32_000_000)
    small = np.array([(375, 500), (500, 375)] * 128)
    assert len(resize_chunks(small, np.full((256, 4), 100.0))) == 256 // gpu_decode.RESIZE_CHUNK, "as before"


def test_expandable_cuda_segments_are_the_default_unless_the_user_configured_the_allocator():
    environ = {}
    default_allocator_settings(environ)
    assert environ == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        mine = {name: "max_split_size_mb:128"}
        default_allocator_settings(mine)
        assert mine == {name: "max_split_size_mb:128"}, "the user's setting is left alone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run it on the device machine")
def test_on_a_gpu_the_warm_up_runs_beside_the_workers_and_rows_match_the_cpu_path(tmp_path, weights_file):
    make_corpus(tmp_path / "in", 40, formats=("jpg", "png"), size=(320, 240))
    logits = {}
    for device in ("cuda", "cpu"):
        result = run_pipeline("classify", str(tmp_path / "in"), str(tmp_path / device), "--weights", str(weights_file),
                              "--device", device, "--workers", "2", "--batch-size", "16", "-v")
        table = pq.read_table(tmp_path / device).sort_by("path")
        assert table["status"].to_pylist() == ["ok"] * 40
        logits[device] = np.array(table["logits"].to_pylist())
        if device == "cuda":
            assert "nvJPEG started in" in result.stderr and "the model's first forward took" in result.stderr
            assert "warm-up failed" not in result.stderr

    gpu, cpu = logits["cuda"], logits["cpu"]
    cosine = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cosine.min() >= 0.999
    assert (gpu.argmax(1) == cpu.argmax(1)).mean() >= 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run it on the device machine")
def test_the_pin_thread_pins_the_jpeg_bytes_so_nvjpeg_copies_them_without_staging(tmp_path):
    make_corpus(tmp_path / "in", 6, formats=("jpg", "png"))
    _, batch = _batch(tmp_path / "in", gpu_jpeg=True)
    assert len(batch.encoded_at) == 3 and len(batch.decoded_at) == 3
    pinned = batch.pin_memory()
    assert pinned.encoded.is_pinned() and pinned.images.is_pinned()
    assert all(view.is_pinned() for view in pinned.jpegs()), "each file's view lies in the pinned block"
    assert torch.equal(pinned.encoded, batch.encoded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run it on the device machine")
def test_nvjpeg_does_not_overwrite_images_that_queued_kernels_have_yet_to_read(tmp_path):
    """torchvision writes its images from its own stream; memory the decode thread's stream still reads
    must not be handed to it. Here the reads wait behind a second of GPU sleep while other photos of
    the same sizes are decoded: they must still see the first photos' pixels."""
    first = [torch.from_numpy(np.frombuffer(write_image(tmp_path / f"a{i}.jpg", i, size=(320, 240)).read_bytes(),
                                            np.uint8).copy()) for i in range(4)]
    second = [torch.from_numpy(np.frombuffer(write_image(tmp_path / f"b{i}.jpg", 10 + i, size=(320, 240)).read_bytes(),
                                             np.uint8).copy()) for i in range(4)]
    decoder = GpuDecoder(torch.device("cuda", 0), PREPROCESS, batch_size=4, dtype=torch.float16)
    expected = [int(image.sum()) for image in decoder._decode_all(first)]
    assert expected != [int(image.sum()) for image in decoder._decode_all(second)], "the two sets differ"

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        images = decoder._decode_all(first)
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU cycles queued before the reads
        sums = [image.sum() for image in images]
        del images  # their memory goes back while the reads are still queued
        again = decoder._decode_all(second)
    stream.synchronize()

    assert [int(total) for total in sums] == expected
    assert len(again) == 4 and all(image is not None for image in again)
