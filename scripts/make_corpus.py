#!/usr/bin/env python3
"""Build a deterministic, ImageNet-like benchmark corpus of image files.

Sources are real colour photos shipped inside installed packages (no network):
``skimage.data`` (astronaut, coffee, chelsea, rocket, hubble_deep_field,
immunohistochemistry, retina, motorcycle left/right) and
``sklearn.datasets.load_sample_images()`` (china, flower). Whatever loads is used
and logged; at least one of scikit-image / scikit-learn must be installed.

Each output file is a random crop (random scale, ImageNet-like aspect ratio from
3:4 to 16:9 in either orientation) of a random source, optionally mirrored, with a
small colour jitter, resized to a width drawn uniformly from 333-800 px (``--width``) and saved
with a random quality (default 79-93: mean JPEG size about 57 KB, KB = 1000 bytes).
For speed the scale is snapped up to a 2**(1/4) grid, so most files are plain crops
of a cached, bicubic-rescaled copy of their source (per-file resampling dominated).
Files go to ``OUT/000/000000.jpg`` ... in folders of 1000. Output depends only on
``--seed``/``--count``/``--formats``/``--quality`` (not on ``--jobs``).
``OUT/_corpus.json`` is written last; if it matches the request the run is skipped.

    python scripts/make_corpus.py --out /data/corpus --count 100000 --jobs 16
"""

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("make_corpus")

PER_DIR = 1000
MIN_W, MAX_W = 333, 800
# Long-side:short-side ratios and their weights (4:3 dominates, as in ImageNet).
RATIOS, RATIO_P = [1.0, 4 / 3, 3 / 2, 16 / 9], [0.15, 0.55, 0.20, 0.10]
P_PORTRAIT = 0.25
EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
MANIFEST = "_corpus.json"
LEVEL_STEP, MAX_LEVEL = 2**0.25, 4  # cached source rescales: LEVEL_STEP**k for k <= 4 (2x)

_SOURCES = []  # per-worker list of PIL images, set by _init_worker
_CFG = {}
_LEVELS = {}  # per-worker cache {(source index, k): rescaled PIL image}


def load_sources():
    """Return {name: HxWx3 uint8 array} for every package-local colour photo that loads."""
    found = {}
    try:
        from skimage import data

        names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
        for name in names:
            try:
                found[name] = getattr(data, name)()
            except Exception as exc:  # e.g. file needs a pooch download
                log.info("skip skimage.data.%s: %s", name, type(exc).__name__)
        try:
            left, right, _ = data.stereo_motorcycle()
            found["motorcycle_left"], found["motorcycle_right"] = left, right
        except Exception as exc:
            log.info("skip skimage.data.stereo_motorcycle: %s", type(exc).__name__)
    except ImportError:
        log.info("scikit-image not installed")
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for fname, img in zip(bunch.filenames, bunch.images, strict=True):
            found[Path(fname).stem] = img
    except Exception as exc:
        log.info("skip sklearn sample images: %s", type(exc).__name__)
    return {
        k: np.ascontiguousarray(v[..., :3], dtype=np.uint8)
        for k, v in found.items()
        if v.ndim == 3 and min(v.shape[:2]) >= 200
    }


def _init_worker(arrays, cfg):
    _SOURCES[:] = [Image.fromarray(a) for a in arrays]
    _CFG.update(cfg)


def rel_path(i, fmt):
    return Path(f"{i // PER_DIR:03d}") / f"{i:06d}.{EXT[fmt]}"


def pick_geometry(rng):
    """Output (width, height) with uniform width and an ImageNet-like aspect ratio."""
    ratio = rng.choice(RATIOS, p=RATIO_P) * rng.uniform(0.97, 1.03)
    aspect = 1 / ratio if rng.random() < P_PORTRAIT else ratio  # width / height
    width = int(rng.integers(_CFG.get("wmin", MIN_W), _CFG.get("wmax", MAX_W) + 1))
    return width, max(1, round(width / aspect))


def crop_box(rng, src_w, src_h, aspect):
    """Random box covering 25-100% of the source area with the given aspect ratio."""
    area = src_w * src_h * rng.uniform(0.25, 1.0)
    cw, ch = np.sqrt(area * aspect), np.sqrt(area / aspect)
    shrink = min(1.0, src_w / cw, src_h / ch)
    cw, ch = cw * shrink, ch * shrink
    x0, y0 = rng.uniform(0, max(0.0, src_w - cw)), rng.uniform(0, max(0.0, src_h - ch))
    return (x0, y0, x0 + cw, y0 + ch)


def source_level(src_idx, k):
    """Source ``src_idx`` rescaled by LEVEL_STEP**k (bicubic), cached per worker."""
    if (src_idx, k) not in _LEVELS:
        src, scale = _SOURCES[src_idx], LEVEL_STEP**k
        size = (round(src.width * scale), round(src.height * scale))
        _LEVELS[src_idx, k] = src.resize(size, Image.BICUBIC)
    return _LEVELS[src_idx, k]


def render(src_idx, box, width, height):
    """The ``box`` region of a source at width x height: a crop of a cached rescale."""
    need = max(width / (box[2] - box[0]), height / (box[3] - box[1]))
    k = math.ceil(math.log(need, LEVEL_STEP))
    if k > MAX_LEVEL:  # rare large upscale: resample directly rather than cache a huge level
        return _SOURCES[src_idx].resize((width, height), Image.BILINEAR, box=box)
    level, scale = source_level(src_idx, k), LEVEL_STEP**k
    x0 = max(0, min(int(box[0] * scale), level.width - width))
    y0 = max(0, min(int(box[1] * scale), level.height - height))
    return level.crop((x0, y0, x0 + width, y0 + height))


def colour_lut(rng):
    """Per-channel lookup table: small brightness, contrast and white-balance jitter."""
    x = np.arange(256, dtype=np.float32)
    base = (x - 128) * rng.uniform(0.9, 1.1) + 128 + rng.uniform(-12, 12)
    chans = [base * rng.uniform(0.94, 1.06) for _ in range(3)]
    return np.clip(np.concatenate(chans), 0, 255).astype(np.uint8).tolist()


def make_one(i):
    """Render and write file ``i``; return (bytes, width)."""
    rng = np.random.default_rng([_CFG["seed"], i])
    src_idx = int(rng.integers(len(_SOURCES)))
    width, height = pick_geometry(rng)
    box = crop_box(rng, _SOURCES[src_idx].width, _SOURCES[src_idx].height, width / height)
    img = render(src_idx, box, width, height)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.point(colour_lut(rng))
    fmt = _CFG["formats"][i % len(_CFG["formats"])]
    quality = int(rng.integers(_CFG["qmin"], _CFG["qmax"] + 1))
    # PNG level 1: ~5x faster to encode than the default 6, decodes as fast.
    opts = {"png": {"compress_level": 1}}.get(fmt, {"quality": quality})
    path = Path(_CFG["out"]) / rel_path(i, fmt)
    img.save(path, format=fmt.upper(), **opts)
    return path.stat().st_size, width


def _read_spec(manifest):
    try:
        return json.loads(manifest.read_text()).get("spec")
    except ValueError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--count", type=int, default=100_000, help="number of files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--formats", default="jpeg", help="comma list of jpeg,png,webp (round-robin)")
    p.add_argument("--quality", default="79-93", help="JPEG/WebP quality range MIN-MAX")
    p.add_argument("--width", default=f"{MIN_W}-{MAX_W}",
                   help="width range MIN-MAX in px (e.g. 1600-4000 for photos of 2-12 megapixels)")
    args = p.parse_args(argv)
    args.formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    if not args.formats or any(f not in EXT for f in args.formats):
        p.error(f"--formats must be a comma list of {sorted(EXT)}")
    args.qmin, args.qmax = (int(q) for q in args.quality.split("-"))
    args.wmin, args.wmax = (int(w) for w in args.width.split("-"))
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    spec = {"count": args.count, "seed": args.seed, "formats": args.formats, "quality": [args.qmin, args.qmax]}
    if (args.wmin, args.wmax) != (MIN_W, MAX_W):  # the default corpus keeps its manifest of old
        spec["width"] = [args.wmin, args.wmax]
    manifest = args.out / MANIFEST
    if manifest.is_file() and _read_spec(manifest) == spec:
        log.info("%s already holds the complete corpus %s; nothing to do", args.out, spec)
        return 0
    manifest.unlink(missing_ok=True)  # an interrupted run must not look complete

    sources = load_sources()
    if not sources:
        log.error("no source photos found; install scikit-image and/or scikit-learn")
        return 1
    log.info("using %d source photos: %s", len(sources), ", ".join(sources))
    for d in range((args.count + PER_DIR - 1) // PER_DIR):
        (args.out / f"{d:03d}").mkdir(parents=True, exist_ok=True)

    cfg = {"seed": args.seed, "formats": args.formats, "out": str(args.out), "qmin": args.qmin, "qmax": args.qmax,
           "wmin": args.wmin, "wmax": args.wmax}
    start, sizes, widths = time.perf_counter(), [], []
    step = max(1, args.count // 10)
    with mp.Pool(args.jobs, _init_worker, (list(sources.values()), cfg)) as pool:
        for n, (size, width) in enumerate(pool.imap_unordered(make_one, range(args.count), 64), 1):
            sizes.append(size)
            widths.append(width)
            if n % step == 0 or n == args.count:
                log.info("%d/%d files (%.1f s)", n, args.count, time.perf_counter() - start)
    secs = time.perf_counter() - start

    total = sum(sizes)
    stats = {
        "files": len(sizes),
        "total_mb": round(total / 1e6, 1),
        "mean_kb": round(total / max(1, len(sizes)) / 1e3, 1),
        "min_width": min(widths, default=0),
        "max_width": max(widths, default=0),
        "seconds": round(secs, 1),
    }
    manifest.write_text(json.dumps({"spec": spec, "sources": list(sources), "stats": stats}, indent=1))
    print(
        "summary: files={files} total_mb={total_mb} mean_kb={mean_kb} "
        "min_width={min_width} max_width={max_width} seconds={seconds}".format(**stats)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
