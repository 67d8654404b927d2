"""Read + decode (+ reduced-scale JPEG decode) + letterbox one image, on a worker thread.

The decoders release the GIL, so a few threads decode in parallel. Exact mode gives the pixels
of Ultralytics' ``imread`` (``np.fromfile`` + ``cv2.imdecode``) and letterboxes with
Ultralytics' own ``LetterBox``, so its model input equals ``model.predict``'s.

Baseline and progressive YCbCr or grayscale JPEGs (4:4:4, 4:2:2, 4:2:0) without an EXIF
rotation go through libjpeg-turbo's TurboJPEG API (``simplejpeg``) with the same integer IDCT
and the same smooth chroma upsampling as ``cv2.imdecode``: the same pixels, bit for bit
(tested), in about 55 % of the time on the benchmark drop. Each decode thread keeps its
full-size buffer, so a 70 MB image is not mapped and faulted in afresh every time. Everything
else (other formats, CMYK, EXIF rotations, a JPEG TurboJPEG refuses) goes to ``cv2.imdecode``,
Ultralytics' own decoder, which then decides what the file looks like.

Fast mode asks libjpeg for a 1/2, 1/4 or 1/8 scale decode (DCT-domain scaling: most of the
inverse DCT and colour conversion is skipped) when the model input is that much smaller than
the image; boxes are scaled back to the full-size image afterwards. Pixels differ slightly
from a full decode + resize, so the mode is an option with a measured agreement.

A bad image never raises here: it comes back with ``error`` set to a specific reason.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import simplejpeg
from PIL import Image

# Pillow reads only the header here; the size check below is ours, so silence its own.
Image.MAX_IMAGE_PIXELS = None

_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}
JPEG_FORMATS = {"JPEG", "MPO"}
# What the TurboJPEG path takes; these decode to the same pixels as cv2.imdecode (tested).
_TURBO_COLORSPACES = {"YCbCr", "Gray"}
_TURBO_SUBSAMPLINGS = {"444", "422", "420", "Gray"}
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass
class DecodedImage:
    index: int  # position in the shard, keeps batches and outputs in manifest order
    path: Path | None  # None: read from object storage (see Decoder.__call__)
    rel_path: str
    bytes: int = 0
    orig_shape: tuple[int, int] = (0, 0)  # (h, w) of the full-size image
    decoded_shape: tuple[int, int] = (0, 0)  # (h, w) actually decoded (smaller in fast mode)
    input: np.ndarray | None = None  # letterboxed HWC BGR uint8 model input
    image: np.ndarray | None = None  # decoded image, kept only for annotated outputs
    error: str | None = None
    seconds: float = 0.0
    decoder: str = ""  # "turbojpeg" or "opencv": which one made the pixels


def reduction_factor(orig_hw: tuple[int, int], imgsz: int | tuple[int, int]) -> int:
    """Largest libjpeg scale (1, 2, 4, 8) whose output still covers the letterboxed size.

    The letterbox scales the image by min(target h / h, target w / w); decoding at 1/k never
    drops below that, so the resize that follows is still a downscale and the tensor shape is
    unchanged.
    """
    th, tw = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    ratio = max(orig_hw[0] / th, orig_hw[1] / tw)
    for k in (8, 4, 2):
        if ratio >= k:
            return k
    return 1


class Decoder:
    """Callable that turns a file into a ``DecodedImage`` (thread-safe: the only state it
    keeps is each decode thread's own reusable buffer)."""

    def __init__(self, imgsz: int | tuple[int, int], stride: int, fast: bool = False,
                 keep_image: bool = False, max_pixels: int = 400_000_000, turbojpeg: bool = True,
                 make_input: bool = True) -> None:
        from ultralytics.data.augment import LetterBox

        self.imgsz = imgsz
        self.fast = fast
        self.keep_image = keep_image
        self.make_input = make_input  # False: only the decoded image (sliced, no full pass)
        self.max_pixels = max_pixels
        self.turbojpeg = turbojpeg  # False: cv2.imdecode for every file (the bench compares)
        # Same construction as Ultralytics' predictor for one image: rect (auto) padding.
        self.letterbox = LetterBox((imgsz, imgsz) if isinstance(imgsz, int) else imgsz, auto=True,
                                   stride=stride)
        self._local = threading.local()  # per decode thread: its reusable full-size buffer

    def __call__(self, index: int, path: Path | None, rel_path: str,
                 data: bytes | Exception | None = None) -> DecodedImage:
        """Decode the file at ``path``, or ``data``: the bytes read from object storage (or
        the error the read raised), for an image that has no local path."""
        start = time.perf_counter()
        item = DecodedImage(index=index, path=path, rel_path=rel_path)
        try:
            self._decode(item, data)
        except MemoryError:
            item.error = "out of memory while decoding"
        except cv2.error as exc:
            item.error = f"decoder error: {str(exc).strip().splitlines()[-1][:200]}"
        item.seconds = time.perf_counter() - start
        return item

    def _decode(self, item: DecodedImage, raw: bytes | Exception | None = None) -> None:
        try:
            if raw is None:
                assert item.path is not None, "an image without a path comes with its bytes"
                size = os.stat(item.path, follow_symlinks=False).st_size
                data = np.fromfile(item.path, np.uint8)
            elif isinstance(raw, Exception):
                raise raw
            else:
                size, data = len(raw), np.frombuffer(raw, np.uint8)
        except PermissionError:
            item.error = "unreadable: permission denied"
            return
        except IsADirectoryError:
            item.error = "not a file: is a directory"
            return
        except FileNotFoundError:
            item.error = "missing: the file disappeared before it was read"
            return
        except OSError as exc:
            item.error = f"unreadable: {exc.strerror or exc}"
            return
        item.bytes = size
        if data.size == 0:
            item.error = "empty file (0 bytes)"
            return
        header = _probe(data)
        if isinstance(header, str):
            item.error = header
            return
        fmt, (w, h), rotated = header
        if w * h > self.max_pixels:
            item.error = (f"image too large: header says {w}x{h} "
                          f"({w * h / 1e6:.0f} MP > limit {self.max_pixels / 1e6:.0f} MP)")
            return
        item.orig_shape = (h, w)
        factor = reduction_factor((h, w), self.imgsz) if self.fast and fmt in JPEG_FORMATS else 1
        img, buffer = None, None
        if fmt == "JPEG" and not rotated and self.turbojpeg:
            img, buffer = self._turbo_decode(data, (h, w), factor)
        item.decoder = "turbojpeg" if img is not None else "opencv"
        if img is None:
            img = cv2.imdecode(data, _REDUCED_FLAGS[factor] if factor > 1 else cv2.IMREAD_COLOR)
        del data
        if img is None:
            item.error = f"cannot decode {fmt} data (corrupt or truncated)"
            return
        if factor == 1 and img.shape[:2] != (h, w):
            item.orig_shape = img.shape[:2]  # EXIF orientation swapped the axes
        elif factor > 1 and (img.shape[0] > img.shape[1]) != (h > w):
            item.orig_shape = (w, h)
        item.decoded_shape = img.shape[:2]
        if self.make_input:
            item.input = cast(np.ndarray, self.letterbox(image=img))
            if buffer is not None and np.may_share_memory(item.input, buffer):
                item.input = item.input.copy()  # no resize, no padding: it is the buffer itself
        if self.keep_image:
            item.image = img

    def _turbo_decode(self, data: np.ndarray, hw: tuple[int, int], factor: int
                      ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(image, the buffer it lives in) through TurboJPEG, or (None, None) when this JPEG
        is one for ``cv2.imdecode`` (see the module doc); never raises for a bad file."""
        h, w = hw
        out_h, out_w = -(-h // factor), -(-w // factor)  # libjpeg's scaled size rounds up
        try:
            head_h, head_w, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
            if ((head_h, head_w) != (h, w) or colorspace not in _TURBO_COLORSPACES
                    or subsampling not in _TURBO_SUBSAMPLINGS):
                return None, None
            buffer = None
            if not self.keep_image:  # a kept image lives on in the writer: no reuse then
                buffer = getattr(self._local, "buffer", None)
                if buffer is None or buffer.size < out_h * out_w * 3:
                    buffer = self._local.buffer = np.empty(out_h * out_w * 3, np.uint8)
            img = simplejpeg.decode_jpeg(data, "BGR", min_height=out_h if factor > 1 else 0,
                                         min_width=out_w if factor > 1 else 0, buffer=buffer)
        except ValueError:
            return None, None  # corrupt, truncated or unusual: cv2.imdecode decides
        if img.shape[:2] != (out_h, out_w):
            return None, None
        return img, buffer


def _probe(data: np.ndarray) -> tuple[str, tuple[int, int], bool] | str:
    """Format, (w, h) and whether EXIF asks for a rotation or flip, from the header alone; or
    a reason why this is not an image."""
    import io

    # Headers sit in the first bytes; a JPEG with large APPn segments (EXIF, ICC) before its
    # frame header needs a longer look.
    for size in (1 << 16, 1 << 22):
        try:
            with Image.open(io.BytesIO(data[:size].tobytes())) as im:
                return str(im.format), im.size, _rotated(im)
        except Exception:
            if data.size <= size:
                break
    return "not an image (unrecognised header)"


def _rotated(im: Image.Image) -> bool:
    """Whether EXIF orientation asks for a rotation or flip (an unreadable EXIF block counts as
    yes: such files go to cv2.imdecode, which has always decided what they look like)."""
    try:
        return im.getexif().get(_EXIF_ORIENTATION, 1) != 1
    except Exception:
        return True
