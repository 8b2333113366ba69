"""Decoding in workers: uint8 tensors exactly as the weights' transforms make them; failures are data."""

import torch
from PIL import Image

from pipeline.decode import ImageFiles, Preprocess, collate, decode_file
from pipeline.model import preprocessing_transforms
from pipeline.plan import list_images, new_plan
from tests.conftest import write_image

PREPROCESS = Preprocess.from_transforms(preprocessing_transforms())


def _reference(path):
    """The weights' own transforms, undone to uint8: what decode_file must produce."""
    transforms = preprocessing_transforms()
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
    plan = new_plan(list_images(tmp_path), 10, {})
    dataset = ImageFiles(tmp_path, plan, [0, 1, 2], PREPROCESS)

    batch = collate([dataset[i] for i in range(3)])

    assert batch.indices.tolist() == [0, 1, 2]
    assert batch.decoded_at == [0, 2] and batch.jpegs() == []
    assert batch.errors[0] is None and batch.errors[2] is None
    assert batch.errors[1].startswith("UnidentifiedImageError")
    assert batch.images.shape == (2, 3, 224, 224)
    assert torch.equal(batch.images[1], decode_file(tmp_path / "c.png", PREPROCESS))
