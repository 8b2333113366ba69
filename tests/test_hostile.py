"""The whole job on hostile and odd input, in real processes: one honest row per file, a real worker death
survived, good rows exactly as without the bad files, the error-rate exit code, and `pipeline errors`."""

import json
import os
import shutil
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from tests.conftest import make_corpus, run_pipeline, write_image
from tests.test_decode import encoded, photo, png_bomb

ACCEPTED = "accepted: JPEG, PNG, WEBP, BMP, GIF, TIFF"


def _odd_images(root):
    """Valid but unusual images: each must be classified."""
    write_image(root / "odd/cmyk.jpg", 1, mode="CMYK")
    write_image(root / "odd/gray.png", 2, mode="L")
    write_image(root / "odd/gray alpha.png", 3, mode="LA")
    write_image(root / "odd/palette.gif", 4, mode="P")
    write_image(root / "odd/palette-transparent.png", 5, mode="P", transparency=0)
    write_image(root / "odd/rgba.png", 6, mode="RGBA")
    ramp = (np.arange(90 * 70, dtype=np.int64).reshape(70, 90) * 10).astype(np.uint16)
    Image.fromarray(ramp).save(root / "odd/sixteen.png")
    Image.fromarray(ramp.astype(np.int32)).save(root / "odd/int32.tif")
    Image.fromarray(ramp.astype(np.float32) / 1000).save(root / "odd/float.tif")
    write_image(root / "odd/bilevel.bmp", 7, mode="1")
    frames = [Image.new("RGB", (64, 48), color) for color in ("red", "green", "blue")]
    for suffix in ("gif", "webp"):
        frames[0].save(root / f"odd/animated.{suffix}", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "odd/one-pixel.png")
    write_image(root / "odd/panorama.png", 8, size=(2400, 30))
    rotated = Image.new("RGB", (120, 80), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(root / "odd/rotated.jpg", exif=exif)
    (root / "odd/png-content.jpg").write_bytes(encoded(Image.new("RGB", (50, 40), "teal"), "PNG"))
    photo(root / "odd/big.jpg", (3000, 2000))
    write_image(root / "names/with space.jpg", 9)
    write_image(root / "names/ünïcödé 写真.webp", 10)
    write_image(Path(os.fsdecode(os.fsencode(root) + b"/names/caf\xe9.jpg")), 12)  # a Latin-1 name: classified


def _bad_files(root):
    """Files that cannot be classified: relative path -> the exact error (or its start, ending in '...')."""
    (root / "bad").mkdir()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    jpeg = encoded(noise, "JPEG")
    png = bytearray(encoded(noise, "PNG"))
    png[60] ^= 0xFF
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/half.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "bad/page.jpg").write_bytes(b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>\n")
    (root / "bad/bomb.png").write_bytes(png_bomb(40_000, 40_000))
    (root / "bad/portable.png").write_bytes(encoded(noise, "PPM"))
    (root / "bad/flipped.png").write_bytes(bytes(png))
    os.symlink(root / "bad/gone.jpg", root / "bad/dangling.jpg")
    os.symlink(root / "odd", root / "bad/folder.jpg")
    write_image(root / "bad/crash.png", 11)  # a valid image whose decoding kills the worker (test hook)
    return {
        "bad/empty.jpg": "empty file",
        "bad/half.jpg": "truncated image: image file is truncated...",
        "bad/page.jpg": "not an image (looks like HTML)",
        "bad/bomb.png": "decompression bomb: 1600000000 pixels > limit 178956970",
        "bad/portable.png": f"unsupported format: the content looks like PPM; {ACCEPTED}",
        "bad/flipped.png": "corrupt image: OSError: broken data stream when reading image file",
        "bad/dangling.jpg": f"broken symlink: its target {root / 'bad/gone.jpg'} does not exist",
        "bad/folder.jpg": "unreadable file: a folder",
        "bad/crash.png": "decoder crashed: killed by SIGSEGV",
    }


def _matches(error, expected):
    return error.startswith(expected[:-3]) if expected.endswith("...") else error == expected


def read_output(out):
    return ds.dataset(str(out), format="parquet").to_table().sort_by("path").to_pydict()


@pytest.mark.slow
def test_hostile_input_gives_one_honest_row_per_file_and_the_error_rate_exit(tmp_path):
    from pipeline.source import encode_path

    root, clean = tmp_path / "in", tmp_path / "clean"
    good = [f"good/{path}" for path in make_corpus(root / "good", 6)]
    _odd_images(root)
    bad = _bad_files(root)
    (root / "notes.txt").write_text("not an image")
    ok_files = good + [str(p.relative_to(root)) for p in root.glob("[on]*/*") if p.is_file()]
    for path in ok_files:
        (clean / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / path, clean / path)
    ok_paths = sorted(encode_path(path) for path in ok_files)
    # batch size 1: CPU kernels are not batch-invariant (~2e-6), and the good rows must be bitwise identical
    common = ["--weights", "random", "--device", "cpu", "--batch-size", "1", "--shard-size", "8", "--workers", "2"]

    result = run_pipeline("classify", str(root), str(tmp_path / "out"), *common, check=False,
                          env={"PIPELINE_TEST_CRASH_ON": "crash.png"})
    run_pipeline("classify", str(clean), str(tmp_path / "clean-out"), *common)

    # one row per file: the odd ones classified, each bad one an error with its exact cause
    rows = read_output(tmp_path / "out")
    assert rows["path"] == sorted(ok_paths + list(bad)) and len(ok_paths) == 26
    by_path = {path: i for i, path in enumerate(rows["path"])}
    for path in ok_paths:
        i = by_path[path]
        assert rows["status"][i] == "ok" and rows["error"][i] is None and len(rows["logits"][i]) == 1000, path
    for path, expected in bad.items():
        i = by_path[path]
        assert rows["status"][i] == "error" and _matches(rows["error"][i], expected), (path, rows["error"][i])
        assert rows["logits"][i] is None and rows["label"][i] is None and rows["prob"][i] is None

    # the good rows are exactly those of a run that never saw the bad files
    clean_rows = read_output(tmp_path / "clean-out")
    assert clean_rows["path"] == ok_paths
    ours = np.array([rows["logits"][by_path[path]] for path in ok_paths], dtype=np.float32)
    np.testing.assert_array_equal(ours, np.array(clean_rows["logits"], dtype=np.float32))
    assert [rows["label"][by_path[path]] for path in ok_paths] == clean_rows["label"]

    # 9 errors in 35 rows is over the default 5%: all committed, exit 3, and the log says what failed
    assert result.returncode == 3, result.stderr
    assert "9 of 35 images failed (25.7%), more than --max-error-rate 0.05 allows" in result.stderr
    assert ("first failed files: bad/bomb.png (decompression bomb: 1600000000 pixels > limit 178956970); "
            "bad/crash.png (decoder crashed") in result.stderr
    assert "a decode worker died (killed by SIGSEGV)" in result.stderr
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["status_counts"] == {"error": 9, "ok": 26}
    assert manifest["error_counts"] == {
        "broken symlink": 1, "corrupt image": 1, "decoder crashed": 1, "decompression bomb": 1, "empty file": 1,
        "not an image (looks like HTML)": 1, "truncated image": 1, "unreadable file": 1, "unsupported format": 1,
    }
    assert manifest["run"]["ignored_files"] == 1

    # a higher gate accepts the same finished output, untouched
    accepted = run_pipeline("classify", str(root), str(tmp_path / "out"), *common, "--max-error-rate", "0.3")
    assert "nothing to do" in accepted.stderr

    # every failed row, as text and as JSON lines
    text = run_pipeline("errors", str(tmp_path / "out")).stdout.splitlines()
    assert [line.split("\t")[0] for line in text] == sorted(bad)
    assert all(_matches(line.split("\t")[1], bad[line.split("\t")[0]]) for line in text)
    records = [json.loads(line) for line in run_pipeline("errors", str(tmp_path / "out"), "--json").stdout.splitlines()]
    assert {r["path"]: r["cause"] for r in records} == {p: e.split(": ")[0].removesuffix("...") for p, e in bad.items()}


def test_errors_on_a_folder_that_is_no_output_exits_2(tmp_path):
    result = run_pipeline("errors", str(tmp_path), check=False)
    assert result.returncode == 2 and "is not the output of a classify run" in result.stderr


# Round 2 (issue 17): names, folders and special files, each through the CLI in a real process.
ROUND2 = ["--weights", "random", "--device", "cpu", "--batch-size", "4", "--workers", "1", "--progress", "log",
          "--max-error-rate", "1"]


def test_a_raw_byte_name_and_its_escaped_spelling_get_two_paths_each_naming_its_file(tmp_path):
    root = tmp_path / "in"
    write_image(Path(os.fsdecode(os.fsencode(root) + b"/\xff\xfe.jpg")), 1)  # the raw bytes ff fe
    write_image(root / "\\xff\\xfe.jpg", 2)  # a name spelt backslash, x, f, f, ...
    write_image(root / "back\\slash.png", 3)

    run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2)

    rows = read_output(tmp_path / "out")
    assert rows["path"] == ["\\\\xff\\\\xfe.jpg", "\\xff\\xfe.jpg", "back\\\\slash.png"], "unique, reversible"
    assert rows["status"] == ["ok"] * 3
    from pipeline.source import decode_path  # here: the test runs against versions without it

    names = [os.fsencode(decode_path(path)) for path in rows["path"]]  # each path names its file's bytes
    assert names == [b"\\xff\\xfe.jpg", b"\xff\xfe.jpg", b"back\\slash.png"]
    assert run_pipeline("verify", str(tmp_path / "out")).returncode == 0


def test_symlinked_folders_are_followed_without_loops_or_repeats(tmp_path):
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    write_image(root / "a.jpg", 0)
    for i in range(50):
        write_image(elsewhere / f"{i:02d}.png", i, size=(16, 12))
    os.symlink("../elsewhere", root / "more")
    os.symlink("../elsewhere", root / "more-again")  # the same folder a second way
    os.symlink("..", elsewhere / "loop")  # back up: a loop

    result = run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2)

    rows = read_output(tmp_path / "out")
    assert rows["path"] == ["a.jpg"] + [f"more/{i:02d}.png" for i in range(50)]
    assert set(rows["status"]) == {"ok"}
    assert "more-again is a symlink to a folder listed already (more): not listed again" in result.stderr


def test_a_folder_that_cannot_be_listed_is_logged_and_counted_and_the_run_goes_on(tmp_path):
    """Below INPUT a folder that cannot be listed (here: its path is longer than the system allows) costs its files,
    not the run."""
    root = tmp_path / "in"
    write_image(root / "a.jpg", 0)
    deep = deep_folder(root, "deep")

    result = run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2)

    assert read_output(tmp_path / "out")["path"] == ["a.jpg"]
    assert f"cannot list folder {deep} (path too long: File name too long)" in result.stderr
    assert "unlisted_folders=1" in result.stderr
    assert "folders not listed (their files have no rows), by cause: path too long: 1" in result.stderr
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["unlisted_folders"] == {"path too long": 1}


def deep_folder(root, name: str) -> str:
    """Folders nested deeper than PATH_MAX allows a path to name (made through folder descriptors), the last one
    holding an image; returns the first relative path that is too long to list."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    parts, relative = [name], name
    os.mkdir(name, dir_fd=fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    while len(os.fsencode(str(root / relative))) < os.pathconf(root, "PC_PATH_MAX"):
        parts.append("d" * 200)
        relative = "/".join(parts)
        os.mkdir(parts[-1], dir_fd=fd)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    with open(os.open("image.jpg", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
        f.write(b"\xff\xd8\xff")
    return relative


def test_image_named_fifos_sockets_and_devices_get_a_row(tmp_path):
    root = tmp_path / "in"
    write_image(root / "a.jpg", 0)
    os.mkfifo(root / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "socket.png"))
    os.symlink("/dev/null", root / "null.gif")

    run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2)

    server.close()
    rows = read_output(tmp_path / "out")
    assert rows["path"] == ["a.jpg", "fifo.jpg", "null.gif", "socket.png"]
    assert rows["error"] == [None, "not a regular file: a FIFO", "not a regular file: a character device",
                             "not a regular file: a socket"]
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["error_counts"] == {"not a regular file": 3} and manifest["run"]["ignored_files"] == 0


def padded_jpeg(path, padding: int) -> int:
    """A 64x64 JPEG whose metadata (APP1 segments of zeros) takes `padding` bytes more, written sparse (only the
    segment headers take disk space); returns the file's size."""
    jpeg = encoded(Image.new("RGB", (64, 64), "teal"), "JPEG")
    with open(path, "wb") as f:
        f.write(jpeg[:2])
        for _ in range(padding // 65537):
            f.write(b"\xff\xe1\xff\xff")
            f.seek(65533, os.SEEK_CUR)
        f.write(jpeg[2:])
    return os.path.getsize(path)


@pytest.mark.slow
def test_a_file_over_the_byte_limit_is_an_error_row_and_never_read(tmp_path):
    """Pillow keeps a JPEG's metadata in memory: 600 MiB of APP segments would cost a worker 600 MB. Over the
    default --max-file-bytes (512 MiB) it is refused from its size; a lower limit refuses smaller files."""
    root = tmp_path / "in"
    write_image(root / "a.jpg", 0)
    size = padded_jpeg(root / "padded.jpg", 600 * 2**20)
    small = padded_jpeg(root / "small.jpg", 2 * 2**20)

    run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2)
    assert read_output(tmp_path / "out")["error"] == [None, f"file too large: {size} bytes > limit 536870912", None]

    run_pipeline("classify", str(root), str(tmp_path / "low"), *ROUND2, "--max-file-bytes", str(2**20))
    assert read_output(tmp_path / "low")["error"] == [None, f"file too large: {size} bytes > limit 1048576",
                                                      f"file too large: {small} bytes > limit 1048576"]


def test_a_batch_size_that_cannot_fit_in_memory_is_refused_before_any_write_naming_one_that_fits(tmp_path):
    root = tmp_path / "in"
    write_image(root / "a.jpg", 0)

    result = run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2, "--batch-size", "10000000",
                          check=False)

    assert result.returncode == 2, result.stderr
    assert "--batch-size 10000000 needs about" in result.stderr and "or less (or fewer --workers)" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing written"


def slow_jpeg(path, side: int = 4096, scans: int = 30000) -> None:
    """A small progressive grey JPEG that takes a decoder a long time: a side x side frame and one AC scan that
    skips every block with end-of-band runs, repeated `scans` times. Each repeat costs the decoder a pass over every
    block (about 2 ms at 4096 here: 30,000 repeats, 1.2 MB, about a minute), and the result is a valid image."""
    blocks = (side // 8) ** 2
    assert blocks % 16384 == 0, "runs of 16384 blocks (EOB14, no extra bits) must cover the frame"

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    def entropy(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)
        data = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
        return data.replace(b"\xff", b"\xff\x00")

    one_symbol = bytes([1] + [0] * 15)  # a Huffman table of one symbol, coded '0'
    head = [b"\xff\xd8", segment(0xDB, b"\x00" + bytes([1] * 64)),
            segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00"),  # progressive, 1 component
            segment(0xC4, b"\x00" + one_symbol + b"\x00"),  # DC: category 0 (no change)
            segment(0xC4, b"\x10" + one_symbol + b"\xe0"),  # AC: EOB14, a run of 16384 blocks + 14 extra bits
            segment(0xDA, b"\x01\x01\x00\x00\x00\x00"), entropy("0" * blocks)]  # the DC scan
    ac_scan = segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + entropy("0" * 15 * (blocks // 16384))
    with open(path, "wb") as f:
        f.write(b"".join(head) + ac_scan * scans + b"\xff\xd9")


@pytest.mark.slow
def test_a_file_that_decodes_too_long_is_an_error_row_and_the_wait_is_logged(tmp_path):
    """A 1 MB progressive JPEG that takes about a minute to decode (and was an ok row after that minute)."""
    root = tmp_path / "in"
    for i in range(6):
        write_image(root / f"{i}.jpg", i)
    slow_jpeg(root / "3-slow.jpg")
    started = time.monotonic()

    result = run_pipeline("classify", str(root), str(tmp_path / "out"), *ROUND2, "--decode-timeout", "2")

    seconds = time.monotonic() - started
    rows = read_output(tmp_path / "out")
    assert rows["path"] == ["0.jpg", "1.jpg", "2.jpg", "3-slow.jpg", "3.jpg", "4.jpg", "5.jpg"]
    assert rows["error"] == [None] * 3 + ["decode timed out: over 2 s"] + [None] * 3
    assert "3-slow.jpg was still decoding after" in result.stderr
    assert seconds < 40, f"{seconds:.0f} s: the slow file was decoded to its end, or twice"
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["error_counts"] == {"decode timed out": 1}
