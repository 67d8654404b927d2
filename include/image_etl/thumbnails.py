"""Pictures for the Detections page, from the files the results DB points at.

- ``open_confined``: ``<drop_dir>/<rel_path>`` -- both as the load recorded them --
  and nothing else. ``rel_path`` must be relative without ``.``/``..``; it is walked one
  component at a time from the drop folder with ``O_NOFOLLOW``, so no symbolic link (file or
  folder) is followed and no path can leave the folder, even if the tree changes meanwhile.
  The drop folder itself is the deployment's: it may be a link (a mounted volume).
- ``thumbnail``: the image at most ``THUMB_MAX_SIDE`` pixels on its long side, decoded at
  1/2-1/8 scale in libjpeg's DCT domain when it is that much bigger (a 2048 x 12000 JPEG
  decodes straight to 256 x 1500, ~20 ms), as JPEG; ``cached_thumbnail`` keeps it under the
  output folder (``<output_dir>/_thumbnails/``) keyed by the source's size and mtime; for an
  image in object storage, in a local folder of the api-server, keyed by size and checksum.
- ``region``: a crop at native resolution, at most ``REGION_MAX_SIDE`` on a side, as JPEG.

Pixels come from ``cv2.imdecode``, which also applies EXIF orientation: the frame the model's
boxes are in (``decode.py``'s TurboJPEG path gives the same pixels).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath
from typing import NamedTuple

log = logging.getLogger(__name__)

THUMB_MAX_SIDE = 1500
REGION_MAX_SIDE = 1024
MAX_SOURCE_PIXELS = 400_000_000  # as decode.Decoder: larger headers are refused
MAX_SOURCE_BYTES = 512 << 20
CACHE_DIR = "_thumbnails"
JPEG_QUALITY = 85
# A full decode of a 2048 x 12000 image holds 74 MB: at most this many at once.
_FULL_DECODES = threading.BoundedSemaphore(2)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class ImageFileError(Exception):
    """The image cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- confined reading ---------------------------------------------------------------------------

def relative_parts(rel_path: object) -> tuple[str, ...]:
    """The components of a recorded rel_path; ImageFileError(404) if it could leave its folder."""
    if not isinstance(rel_path, str) or not rel_path or "\x00" in rel_path:
        raise ImageFileError(404, "the recorded image path is not usable")
    path = PurePosixPath(rel_path)
    parts = rel_path.split("/")
    if path.is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ImageFileError(404, "the recorded image path is not inside its drop folder")
    return tuple(parts)


def recorded_folder(folder: object, what: str) -> str:
    """A recorded folder: absolute, without '..'; ImageFileError(404) otherwise."""
    if not isinstance(folder, str) or not folder or "\x00" in folder:
        raise ImageFileError(404, f"no {what} is recorded for this image")
    path = PurePosixPath(folder)
    if not path.is_absolute() or ".." in path.parts:
        raise ImageFileError(404, f"the recorded {what} is not an absolute path")
    return folder


class SourceFile:
    """An image file opened by ``open_confined``: its stat now, its bytes on ``read()``."""

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd, self.stat = fd, st

    def read(self) -> bytes:
        return _read_all(self.fd, self.stat.st_size, offset=0)


@contextlib.contextmanager
def open_confined(drop_dir: object, rel_path: object) -> Iterator[SourceFile]:
    """``<drop_dir>/<rel_path>`` opened through descriptors that never follow a link; only a
    regular file of at most MAX_SOURCE_BYTES. ImageFileError(404) says why not."""
    fd = _open_confined(drop_dir, rel_path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileError(404, "the image path is not a regular file")
        if st.st_size > MAX_SOURCE_BYTES:
            raise ImageFileError(404, f"the image file is larger than {MAX_SOURCE_BYTES >> 20} MB")
        yield SourceFile(fd, st)
    finally:
        os.close(fd)


def _open_confined(drop_dir: object, rel_path: object) -> int:
    parts = relative_parts(rel_path)
    root = recorded_folder(drop_dir, "drop folder")
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError:
        raise ImageFileError(404, "the drop folder is not available on this server") from None
    try:
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            flags = (os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC) if last else _DIR_FLAGS
            child = _step(fd, part, flags | os.O_NOFOLLOW)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _step(fd: int, name: str, flags: int) -> int:
    """Open ``name`` in the folder ``fd`` (``flags`` carry O_NOFOLLOW)."""
    try:
        return os.open(name, flags, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise ImageFileError(404, "refused: the image path goes through a symbolic link "
                                      "or a non-folder") from None
        if exc.errno == errno.ENOENT:
            raise ImageFileError(404, "the image file is missing") from None
        raise ImageFileError(404, f"the image file cannot be opened: {exc.strerror}") from None


def _read_all(fd: int, size: int, offset: int | None = None) -> bytes:
    chunks, left, at = [], size, offset
    while left > 0:
        chunk = os.read(fd, min(left, 16 << 20)) if at is None else os.pread(fd, min(left, 16 << 20), at)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        at = None if at is None else at + len(chunk)
    return b"".join(chunks)


# --- pictures ---------------------------------------------------------------------------------------

def _dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; ImageFileError(404) for a non-image or a huge one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception:
        raise ImageFileError(404, "the file is not an image this server can read") from None
    if width * height > MAX_SOURCE_PIXELS:
        raise ImageFileError(404, f"image too large to render ({width}x{height})")
    return width, height


def _decode(data: bytes, scale: int = 1):  # -> np.ndarray
    import cv2
    import numpy as np

    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise ImageFileError(404, "the image file cannot be decoded (corrupt or truncated)")
    return image


def _jpeg(image, quality: int = JPEG_QUALITY) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageFileError(500, "JPEG encoding failed")
    return buf.tobytes()


def thumbnail_scale(width: int, height: int, max_side: int = THUMB_MAX_SIDE) -> int:
    """Largest libjpeg scale (1, 2, 4, 8) whose decode still has ``max_side`` on its long side."""
    for k in (8, 4, 2):
        if -(-max(width, height) // k) >= max_side:
            return k
    return 1


def thumbnail(data: bytes, max_side: int = THUMB_MAX_SIDE) -> bytes:
    """A JPEG at most ``max_side`` pixels on its long side; the whole image is never decoded
    at full size when it is 2x, 4x or 8x bigger than that."""
    import cv2

    width, height = _dimensions(data)
    scale = thumbnail_scale(width, height, max_side)
    if scale == 1:
        with _FULL_DECODES:
            image = _decode(data)
    else:
        image = _decode(data, scale)
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        f = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))),
                           interpolation=cv2.INTER_AREA)
    return _jpeg(image)


def region(data: bytes, x: int, y: int, w: int, h: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """The native-resolution crop (x, y, w, h) -- sides capped at REGION_MAX_SIDE, clipped to the
    image -- as JPEG, with the box actually cut."""
    if min(w, h) < 1 or min(x, y) < 0:
        raise ImageFileError(400, "region: x and y must be >= 0, w and h >= 1")
    _dimensions(data)  # refuses a huge image before decoding it
    w, h = min(w, REGION_MAX_SIDE), min(h, REGION_MAX_SIDE)
    with _FULL_DECODES:
        image = _decode(data)
        full_h, full_w = image.shape[:2]
        if x >= full_w or y >= full_h:
            raise ImageFileError(400, f"region: ({x}, {y}) is outside the {full_w}x{full_h} image")
        w, h = min(w, full_w - x), min(h, full_h - y)
        crop = image[y:y + h, x:x + w].copy()
        del image
    return _jpeg(crop, 90), (x, y, w, h)


# --- the thumbnail cache ------------------------------------------------------------------------

class ContentVersion(NamedTuple):
    """What identifies an object's content for the cache, as a file's stat does (size and a
    checksum in place of the mtime)."""

    st_size: int
    st_mtime_ns: int


def cache_name(image_id: int, st: os.stat_result | ContentVersion,
               max_side: int = THUMB_MAX_SIDE) -> str:
    """Changes whenever the source file does (size, mtime)."""
    return f"{int(image_id)}-{st.st_size:x}-{st.st_mtime_ns:x}-{max_side}.jpg"


def cached_thumbnail(output_dir: object, image_id: int, st: os.stat_result | ContentVersion,
                     make: Callable[[], bytes]) -> tuple[bytes, bool]:
    """(thumbnail, whether it came from the cache). The cache lives in
    ``<output_dir>/_thumbnails`` when the output folder exists and is writable here; otherwise
    the thumbnail is made each time. Files there are opened without following links."""
    name = cache_name(image_id, st)
    folder = _cache_folder(output_dir)
    if folder is None:
        return make(), False
    try:
        cached = _read_cached(folder, name)
        if cached:
            return cached, True
        data = make()
        _write_cached(folder, name, data)
        return data, False
    finally:
        os.close(folder)


def _cache_folder(output_dir: object) -> int | None:
    try:
        root = os.open(recorded_folder(output_dir, "output folder"), _DIR_FLAGS)
    except (ImageFileError, OSError):
        return None
    try:
        try:
            os.mkdir(CACHE_DIR, 0o755, dir_fd=root)
        except FileExistsError:
            pass
        return os.open(CACHE_DIR, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root)
    except OSError as exc:
        log.info("no thumbnail cache under %s: %s", output_dir, exc.strerror)
        return None
    finally:
        os.close(root)


def _read_cached(folder: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SOURCE_BYTES:
            return None
        return _read_all(fd, st.st_size) or None
    finally:
        os.close(fd)


def _write_cached(folder: int, name: str, data: bytes) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=folder)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError as exc:
        log.info("cannot cache a thumbnail: %s", exc.strerror)
        try:
            os.unlink(tmp, dir_fd=folder)
        except OSError:
            pass
