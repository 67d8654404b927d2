"""The TurboJPEG path gives exactly ``cv2.imdecode``'s pixels, so exact mode still equals
``model.predict``'s input; the files it does not take go to ``cv2.imdecode`` as before."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from image_etl import synth
from image_etl.decode import _REDUCED_FLAGS, Decoder, reduction_factor

IMGSZ, STRIDE = 640, 32


def _scene(w: int, h: int, seed: int = 3) -> np.ndarray:
    return synth.render(np.random.default_rng(seed), w, h)[0]


def _pil_jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., ::-1])).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _cv2_jpeg(img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, list(params))
    assert ok
    return buf.tobytes()


def _exif_rotated(img: np.ndarray) -> bytes:
    pil = Image.fromarray(np.ascontiguousarray(img[..., ::-1]))
    exif = pil.getexif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif, quality=90)
    return buf.getvalue()


def _variants() -> dict[str, tuple[bytes, str]]:
    """name → (JPEG bytes, the decoder that must make its pixels)."""
    odd = _scene(517, 3001)  # sizes that are no multiple of the 16-pixel MCU
    wide = _scene(2048, 1203, seed=4)
    return {
        "pil-420-q85": (_pil_jpeg(odd, quality=85, subsampling=2), "turbojpeg"),
        "pil-422-q75": (_pil_jpeg(odd, quality=75, subsampling=1), "turbojpeg"),
        "pil-444-q95": (_pil_jpeg(odd, quality=95, subsampling=0), "turbojpeg"),
        "pil-progressive": (_pil_jpeg(odd, quality=90, progressive=True), "turbojpeg"),
        "pil-optimized-huffman": (_pil_jpeg(wide, quality=80, optimize=True), "turbojpeg"),
        "pil-gray": (_gray(odd), "turbojpeg"),
        "cv2-420-q90": (_cv2_jpeg(wide, cv2.IMWRITE_JPEG_QUALITY, 90), "turbojpeg"),
        "cv2-restart-markers": (_cv2_jpeg(wide, cv2.IMWRITE_JPEG_QUALITY, 90,
                                          cv2.IMWRITE_JPEG_RST_INTERVAL, 7), "turbojpeg"),
        "cv2-444": (_cv2_jpeg(odd, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444), "turbojpeg"),
        "cv2-440": (_cv2_jpeg(odd, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440), "opencv"),
        "cmyk": (_cmyk(odd), "opencv"),
        "exif-rotated": (_exif_rotated(odd), "opencv"),
    }


def _gray(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _cmyk(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img[..., ::-1])).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("jpegs")
    out = {}
    for name, (data, decoder) in _variants().items():
        path = folder / f"{name}.jpg"
        path.write_bytes(data)
        out[name] = (path, decoder)
    return out


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("keep_image", [False, True], ids=["reused-buffer", "kept-image"])
def test_decoded_pixels_equal_cv2_imdecode(variants, fast, keep_image):
    from ultralytics.data.augment import LetterBox

    decoder = Decoder(IMGSZ, STRIDE, fast=fast, keep_image=True)
    reusing = Decoder(IMGSZ, STRIDE, fast=fast, keep_image=keep_image)
    letterbox = LetterBox((IMGSZ, IMGSZ), auto=True, stride=STRIDE)
    for name, (path, expected_decoder) in variants.items():
        data = np.fromfile(path, np.uint8)
        full = cv2.imdecode(data, cv2.IMREAD_COLOR)
        factor = reduction_factor(full.shape[:2], IMGSZ) if fast else 1
        reference = full if factor == 1 else cv2.imdecode(data, _REDUCED_FLAGS[factor])
        item = decoder(0, path, path.name)
        assert item.error is None, name
        assert item.decoder == expected_decoder, name
        assert item.image.shape == reference.shape, name
        assert np.array_equal(item.image, reference), f"{name}: pixels differ from cv2.imdecode"
        assert item.orig_shape == full.shape[:2], name
        again = reusing(0, path, path.name)
        assert np.array_equal(again.input, letterbox(image=reference)), name


def test_model_input_never_aliases_the_reused_buffer(tmp_path):
    """An image already at the letterboxed size is neither resized nor padded: LetterBox hands
    back the decoded array itself, which must not be the buffer the next decode overwrites."""
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"exact-size-{seed}.jpg"
        path.write_bytes(_cv2_jpeg(_scene(128, 640, seed=seed), cv2.IMWRITE_JPEG_QUALITY, 90))
        paths.append(path)
    decoder = Decoder(IMGSZ, STRIDE)
    first = decoder(0, paths[0], paths[0].name)
    assert first.decoder == "turbojpeg" and first.input.shape == (640, 128, 3)
    snapshot = first.input.copy()
    second = decoder(1, paths[1], paths[1].name)
    assert not np.array_equal(second.input, snapshot)  # different pictures ...
    assert np.array_equal(first.input, snapshot)  # ... and the first is untouched
    assert np.array_equal(first.input, cv2.imdecode(np.fromfile(paths[0], np.uint8),
                                                    cv2.IMREAD_COLOR))


def test_a_jpeg_turbojpeg_refuses_gets_cv2s_verdict(tmp_path):
    """Truncated data: TurboJPEG refuses it, cv2.imdecode decides (here: not decodable)."""
    data = _cv2_jpeg(_scene(517, 3001), cv2.IMWRITE_JPEG_QUALITY, 90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    item = Decoder(IMGSZ, STRIDE)(0, path, path.name)
    assert item.decoder == "opencv"
    assert item.error == "cannot decode JPEG data (corrupt or truncated)"


def test_turbojpeg_can_be_switched_off(variants):
    """turbojpeg=False (the bench's limit-decode-opencv) decodes with cv2.imdecode: same pixels."""
    path, _ = variants["cv2-420-q90"]
    on = Decoder(IMGSZ, STRIDE, keep_image=True)(0, path, path.name)
    off = Decoder(IMGSZ, STRIDE, keep_image=True, turbojpeg=False)(0, path, path.name)
    assert (on.decoder, off.decoder) == ("turbojpeg", "opencv")
    assert np.array_equal(on.image, off.image) and np.array_equal(on.input, off.input)
