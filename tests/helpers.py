"""Helpers the test modules share: tasks of a folder, box matching, staged records, odd files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from image_etl import synth
from image_etl.staging import read_staging
from image_etl.worker import ImageTask


def tasks_for(root: Path) -> list[ImageTask]:
    return [ImageTask(p, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*.jpg"))]


def iou(a, b) -> float:
    return synth.box_iou(a, b)


def match(preds: list[tuple[int, tuple]], truth: list[tuple[int, tuple]], thr: float = 0.5) -> int:
    """Greedy class-aware matching at IoU >= thr; returns the number of matched pairs."""
    return synth.count_matches(preds, [synth.Box(c, *b) for c, b in truth], thr)


def staged_by_path(staging: Path) -> dict[str, dict]:
    return {r["rel_path"]: r for r in read_staging(staging)[1]}


def scene(w=512, h=3000, seed=1) -> np.ndarray:
    img, _ = synth.render(np.random.default_rng(seed), w, h)
    return img


def pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., ::-1].copy())


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) \
        + chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    img = pil(scene(512, 3000))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    return save(img, "JPEG", exif=exif, quality=90)


CASES: dict[str, tuple[bytes, str | None]] = {}


def bad_cases() -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected error substring or None for a processed image)."""
    if CASES:
        return CASES
    base = scene()
    good = save(pil(base), "JPEG", quality=90)
    CASES.update({
        "truncated.jpg": (good[: len(good) // 3], "corrupt or truncated"),
        "zero.jpg": (b"", "empty file"),
        "text.jpg": (b"just some text, not a picture\n" * 10, "not an image"),
        "png-named.jpg": (save(pil(base), "PNG"), None),
        "gray.jpg": (save(pil(base).convert("L"), "JPEG"), None),
        "cmyk.jpg": (save(pil(base).convert("CMYK"), "JPEG"), None),
        "progressive.jpg": (save(pil(base), "JPEG", progressive=True), None),
        "sixteen-bit.png": (save(Image.fromarray(base[..., 0].astype(np.uint16) * 257), "PNG"), None),
        "bomb.png": (_bomb_png(100_000, 100_000), "image too large"),
        "exif-rotated.jpg": (_exif_rotated(), None),
        "name with spaces 'quotes' \"double\" é漢字.jpg": (good, None),
        "new\nline.jpg": (good, None),
    })
    return CASES
