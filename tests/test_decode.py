"""Decoding in workers: uint8 tensors exactly as the weights' transforms make them; failures are data."""

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.models import ResNet18_Weights, resnet18

from pipeline import testhooks
from pipeline.causes import Unusable
from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.decode import BACKGROUND, ImageFiles, Preprocess, Sample, collate, decode_file, to_rgb
from pipeline.plan import new_plan
from pipeline.source import LocalFolder
from tests.conftest import seeded_state_dict, write_image

PREPROCESS = Preprocess.from_transforms(ResNet18_Weights.IMAGENET1K_V1.transforms())


def _reference(path):
    """The weights' own transforms, undone to uint8: what decode_file must produce."""
    transforms = ResNet18_Weights.IMAGENET1K_V1.transforms()
    with Image.open(path) as image:
        x = transforms(image.convert("RGB"))
    mean = torch.tensor(transforms.mean).view(3, 1, 1)
    std = torch.tensor(transforms.std).view(3, 1, 1)
    return (x * std + mean) * 255


def test_decode_matches_the_weights_transforms(tmp_path):
    for suffix in ("jpg", "png", "webp"):
        path = write_image(tmp_path / f"a.{suffix}", 1, size=(300, 180))
        decoded = decode_file(path, PREPROCESS)
        assert decoded.dtype == torch.uint8 and decoded.shape == (3, 224, 224)
        assert torch.allclose(decoded.float(), _reference(path), atol=1e-3)


def test_exif_orientation_is_applied(tmp_path):
    # Stored left red / right blue with orientation 6 (turn 90° clockwise to show): shown top red / bottom blue.
    stored = Image.new("RGB", (400, 260), "blue")
    stored.paste((255, 0, 0), (0, 0, 200, 260))
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    shown = decode_file(tmp_path / "rotated.jpg", PREPROCESS).float()

    red, blue = shown[0], shown[2]
    assert red[:60].mean() > 200 and blue[:60].mean() < 50, "top should be red"
    assert blue[-60:].mean() > 200 and red[-60:].mean() < 50, "bottom should be blue"


def test_a_bad_file_becomes_an_error_in_its_own_place(tmp_path):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "b.jpg").write_bytes(b"<html>not found</html>")
    write_image(tmp_path / "c.png", 2)
    plan = new_plan(LocalFolder(tmp_path).list(), 10, {})
    dataset = ImageFiles(LocalFolder(tmp_path), plan, [0, 1, 2], PREPROCESS)

    batch = collate([dataset[i] for i in range(3)])

    assert batch.indices.tolist() == [0, 1, 2]
    assert batch.decoded_at == [0, 2] and batch.jpegs() == []
    assert batch.errors[0] is None and batch.errors[2] is None
    assert batch.errors[1] == "not an image (looks like HTML)"
    assert batch.images.shape == (2, 3, 224, 224)
    assert torch.equal(batch.images[1], decode_file(tmp_path / "c.png", PREPROCESS))


# --- hostile and odd input -------------------------------------------------------------------------------------


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **save)
    return buffer.getvalue()


def _error_of(path, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    with pytest.raises(Unusable) as raised:
        decode_file(path, PREPROCESS, max_pixels)
    return str(raised.value)


def test_pillow_default_limit_and_truncation_policy_are_what_the_readme_says():
    assert DEFAULT_MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS, "where Pillow itself refuses"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_files_that_are_not_images_get_their_cause(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    jpeg = encoded(noise, "JPEG")
    png = bytearray(encoded(noise, "PNG"))
    png[60] ^= 0xFF  # a flipped byte inside the compressed pixels
    files = {
        "empty.jpg": (b"", "empty file"),
        "half.jpg": (jpeg[: len(jpeg) // 2], "truncated image: image file is truncated"),
        "header.jpg": (jpeg[:20], "corrupt image: JPEG header cannot be read"),
        "flipped.png": (bytes(png), "corrupt image: OSError: broken data stream when reading image file"),
        "page.jpg": (b"\n<!DOCTYPE html>\n<html><body>Not Found</body></html>", "not an image (looks like HTML)"),
        "s3.png": (b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "not an image (looks like XML)"),
        "quota.webp": (b'{"error": "quota exceeded"}\n', "not an image (looks like text)"),
        "portable.png": (encoded(noise, "PPM"), "unsupported format: the content looks like PPM; accepted: "
                                                "JPEG, PNG, WEBP, BMP, GIF, TIFF"),
        "icon.jpg": (encoded(Image.new("RGB", (32, 32)), "ICO"), "unsupported format: the content looks like ICO"),
        "doc.tif": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "unsupported format: unrecognised content"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)

    for name, (_, expected) in files.items():
        assert _error_of(tmp_path / name).startswith(expected), name


def test_files_that_cannot_be_read_get_their_cause(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    os.symlink(tmp_path / "loop-b.jpg", tmp_path / "loop-a.jpg")
    os.symlink(tmp_path / "loop-a.jpg", tmp_path / "loop-b.jpg")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "folder", tmp_path / "folder.jpg")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "fifo.jpg")  # opening it must not block

    assert _error_of(tmp_path / "dangling.jpg") == f"broken symlink: its target {tmp_path / 'gone.jpg'} does not exist"
    assert _error_of(tmp_path / "loop-a.jpg") == "broken symlink: a symlink loop"
    assert _error_of(tmp_path / "folder.jpg") == "unreadable file: a folder"
    assert _error_of(tmp_path / "fifo.jpg") == "not a regular file: a FIFO"
    assert _error_of(tmp_path / "never-there.jpg") == "file vanished: it was listed but is no longer there"


def test_a_file_deleted_between_plan_and_read_is_a_vanished_row(tmp_path):
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "b.png", 1)
    plan = new_plan(LocalFolder(tmp_path).list(), 10, {})
    (tmp_path / "a.png").unlink()

    dataset = ImageFiles(LocalFolder(tmp_path), plan, [0, 1], PREPROCESS)

    assert dataset[0] == Sample(0, error="file vanished: it was listed but is no longer there")
    assert dataset[1].error is None and dataset[1].image is not None


def test_decompression_bombs_are_refused_from_the_header_at_the_configured_limit(tmp_path):
    (tmp_path / "huge.png").write_bytes(png_bomb(40_000, 40_000))  # over twice the limit: Pillow's error
    (tmp_path / "big.png").write_bytes(png_bomb(15_000, 15_000))  # between once and twice: Pillow's warning

    started = time.perf_counter()
    assert _error_of(tmp_path / "huge.png") == "decompression bomb: 1600000000 pixels > limit 178956970"
    assert _error_of(tmp_path / "big.png") == "decompression bomb: 225000000 pixels > limit 178956970"
    assert _error_of(tmp_path / "big.png", max_pixels=1000) == "decompression bomb: 225000000 pixels > limit 1000"
    assert time.perf_counter() - started < 1, "no pixel was decoded"
    # A higher limit lets the header pass; the missing pixel data is then found, never padded.
    assert _error_of(tmp_path / "big.png", max_pixels=300_000_000).startswith("truncated image")
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS // 2, "Pillow's global is restored"


def test_a_limit_smaller_than_an_image_refuses_it(tmp_path):
    path = write_image(tmp_path / "a.png", 0, size=(100, 50))
    assert _error_of(path, max_pixels=4999) == "decompression bomb: 5000 pixels > limit 4999"
    assert decode_file(path, PREPROCESS, max_pixels=5000).shape == (3, 224, 224)


def premultiplied_tiff(path):
    """A gray + associated-alpha TIFF (Pillow opens it as 'La' but cannot write one): LA with ExtraSamples = 1."""
    Image.new("LA", (80, 60), (100, 128)).save(path)
    data = bytearray(path.read_bytes())
    entry = data.find(struct.pack("<HHI", 338, 3, 1))  # the ExtraSamples tag: SHORT, one value (2: unassociated)
    data[entry + 8: entry + 10] = struct.pack("<H", 1)
    path.write_bytes(bytes(data))
    return path


def _gradient16() -> np.ndarray:
    return (np.arange(64 * 48, dtype=np.float64).reshape(48, 64) * (65535 / (64 * 48 - 1))).astype(np.uint16)


@pytest.mark.parametrize(("name", "image"), [
    ("cmyk.jpg", Image.new("CMYK", (80, 60), (10, 200, 30, 40))),
    ("gray.png", Image.new("L", (80, 60), 90)),
    ("gray-alpha.png", Image.new("LA", (80, 60), (90, 128))),
    ("palette.gif", Image.new("P", (80, 60), 7)),
    ("rgba.webp", Image.new("RGBA", (80, 60), (200, 10, 10, 100))),
    ("bilevel.bmp", Image.new("1", (80, 60), 1)),
    ("sixteen.png", Image.fromarray(_gradient16())),
    ("int32.tif", Image.fromarray(_gradient16().astype(np.int32))),
    ("float.tif", Image.fromarray(np.linspace(-3, 5, 80 * 60, dtype=np.float32).reshape(60, 80))),
    ("one-pixel.png", Image.new("RGB", (1, 1), (0, 255, 0))),
    ("premultiplied.tif", Image.new("La", (80, 60))),
])
def test_unusual_but_valid_images_are_classified(tmp_path, name, image):
    path = tmp_path / name
    if image.mode == "La":
        premultiplied_tiff(path)
    else:
        image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == image.mode, "the file really has the mode under test"

    decoded = decode_file(path, PREPROCESS)

    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 224, 224)


def test_sixteen_bit_and_float_gray_use_their_whole_range():
    ramp = _gradient16()
    for image in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):
        rgb = np.asarray(to_rgb(image))
        assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255, 255, 255]
        assert np.abs(rgb[..., 0].astype(int) - ramp / 257).max() <= 0.5
    floats = np.array([[-2.0, 0.0], [2.0, np.nan]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(floats)))[..., 0].tolist() == [[0, 128], [255, 128]]


def test_transparency_is_composited_onto_the_documented_background():
    assert BACKGROUND == (255, 255, 255)
    transparent_black = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    for image, expected in [
        (transparent_black, (255, 255, 255)),
        (half_red, (255, 127, 127)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("PA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (4, 4), (0, 128)).convert("La"), (127, 127, 127)),
        (palette, (255, 255, 255)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
    ]:
        rgb = to_rgb(image)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((1, 1)) == expected, image.mode


def test_a_mode_pillow_cannot_make_rgb_is_an_error_naming_it():
    class FutureMode:  # every mode Pillow 13 opens converts; this stands for one that would not
        mode, size, has_transparency_data = "XYZ;9", (4, 4), False

        def convert(self, mode):
            raise ValueError(f"conversion from XYZ;9 to {mode} not supported")

    with pytest.raises(Unusable, match=r"^unsupported image mode: XYZ;9 \(conversion from XYZ;9 to RGB not supported"):
        to_rgb(FutureMode())


@pytest.mark.parametrize("format", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(tmp_path, format):
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "green", "blue")]
    path = tmp_path / f"animated.{format.lower()}"
    frames[0].save(path, format, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(path) as opened:
        assert opened.n_frames == 3

    decoded = decode_file(path, PREPROCESS).float()

    assert decoded[0].mean() > 250 and decoded[1].mean() < 5 and decoded[2].mean() < 5, "red, the first frame"


def test_a_multi_picture_jpeg_from_a_camera_gives_its_first_picture(tmp_path):
    Image.new("RGB", (300, 200), "red").save(tmp_path / "stereo.jpg", "MPO", save_all=True,
                                               append_images=[Image.new("RGB", (300, 200), "blue")])
    with Image.open(tmp_path / "stereo.jpg") as opened:
        assert opened.format == "MPO"

    decoded = decode_file(tmp_path / "stereo.jpg", PREPROCESS).float()

    assert decoded[0].mean() > 250 and decoded[2].mean() < 5


def test_extreme_aspect_ratios_match_the_plain_transforms_closely(tmp_path):
    path = write_image(tmp_path / "strip.png", 4, size=(2000, 40))  # 50:1; the transforms resize it to 12800x256

    decoded = decode_file(path, PREPROCESS).float()

    assert (decoded - _reference(path)).abs().mean() < 1.0
    assert decode_file(write_image(tmp_path / "tall.png", 5, size=(3, 900)), PREPROCESS).shape == (3, 224, 224)


def test_the_crash_hook_never_fires_outside_a_worker(tmp_path):
    write_image(tmp_path / "a.png", 0)
    dataset = ImageFiles(LocalFolder(tmp_path), new_plan(LocalFolder(tmp_path).list(), 10, {}), [0], PREPROCESS)
    assert testhooks.crashing(dataset, frozenset({"a.png"}))[0].image.shape == (3, 224, 224)


def test_files_left_to_the_gpu_meet_the_same_checks_and_give_the_same_errors(tmp_path):
    photo(tmp_path / "a-plain.jpg", (640, 480))  # 307200 pixels
    jpeg = (tmp_path / "a-plain.jpg").read_bytes()
    (tmp_path / "b-half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "c-page.jpg").write_bytes(b"<!doctype html><html></html>")
    (tmp_path / "d-empty.jpg").write_bytes(b"")
    (tmp_path / "e-bomb.png").write_bytes(png_bomb(40_000, 40_000))
    plan = new_plan(LocalFolder(tmp_path).list(), 10, {})

    def samples(gpu_jpeg, max_pixels=DEFAULT_MAX_IMAGE_PIXELS):
        dataset = ImageFiles(LocalFolder(tmp_path), plan, list(range(5)), PREPROCESS, gpu_jpeg=gpu_jpeg,
                             max_pixels=max_pixels)
        return [dataset[i] for i in range(5)]

    cpu, gpu = samples(False), samples(True)
    assert gpu[0].encoded == jpeg and cpu[0].image is not None, "only the plain JPEG is left to the GPU"
    assert [s.error for s in gpu[1:]] == [s.error for s in cpu[1:]]
    assert all(s.error for s in gpu[1:]) and gpu[4].error.startswith("decompression bomb: 1600000000 pixels")
    assert samples(True, max_pixels=300_000)[0].error == "decompression bomb: 307200 pixels > limit 300000"


def photo(path, size, seed=0, quality=90):
    """A large JPEG quickly: coarse random structure scaled up, plus fine grain."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
    pixels = pixels + rng.integers(-12, 13, pixels.shape, dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
    return path


@pytest.mark.slow
def test_big_jpegs_decoded_at_reduced_scale_keep_the_logits(tmp_path):
    path = photo(tmp_path / "big.jpg", (4000, 3000))
    model = resnet18()
    model.load_state_dict(seeded_state_dict())
    model.eval()
    transforms = ResNet18_Weights.IMAGENET1K_V1.transforms()
    mean = torch.tensor(transforms.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(transforms.std).view(1, 3, 1, 1) * 255

    drafted = decode_file(path, PREPROCESS, draft=True)
    full = decode_file(path, PREPROCESS, draft=False)

    assert not torch.equal(drafted, full), "the reduced-scale decode really happened"
    with torch.inference_mode():
        logits = model((torch.stack([drafted, full]).float() - mean) / std)
    assert torch.nn.functional.cosine_similarity(logits[0], logits[1], dim=0) >= 0.999


def test_a_name_that_is_not_utf8_is_read_under_its_escaped_path(tmp_path):
    write_image(tmp_path / "d.png", 0)
    os.rename(tmp_path / "d.png", os.fsencode(tmp_path) + b"/caf\xe9.png")
    (tmp_path / "caf\\xe9.png").write_bytes(b"\x89PNG not really")  # its escaped spelling, a name of its own
    plan = new_plan(LocalFolder(tmp_path).list(), 10, {})
    dataset = ImageFiles(LocalFolder(tmp_path), plan, [0, 1], PREPROCESS)

    assert plan.paths.to_pylist() == ["caf\\\\xe9.png", "caf\\xe9.png"]
    assert dataset[0].error.startswith("unsupported format") and dataset[1].error is None


def test_a_file_over_max_bytes_is_refused_before_it_is_read(tmp_path):
    path = write_image(tmp_path / "a.png", 0)
    size = path.stat().st_size
    plan = new_plan(LocalFolder(tmp_path).list(), 10, {})

    assert ImageFiles(LocalFolder(tmp_path), plan, [0], PREPROCESS, max_bytes=size)[0].error is None
    refused = ImageFiles(LocalFolder(tmp_path), plan, [0], PREPROCESS, max_bytes=size - 1)[0]
    assert refused == Sample(0, error=f"file too large: {size} bytes > limit {size - 1}")
    gpu = ImageFiles(LocalFolder(tmp_path), plan, [0], PREPROCESS, gpu_jpeg=True, max_bytes=size - 1)[0]
    assert gpu.error == refused.error
