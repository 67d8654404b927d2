"""What a worker leaves behind: YOLO txt files, annotated images and staged rows for the load.

- txt: byte-compatible with Ultralytics ``Results.save_txt(save_conf=True)``: one line per
  box, ``cls xc yc w h conf`` normalised, ``%g``; an empty file when nothing was detected.
  Written to a temp file and renamed over the old one: readers never see half a file and a
  re-run overwrites, never appends.
- staging: one JSON line per image (status, size, detections) appended to the shard's file as
  each image completes. A retried shard reads it back and skips what is already done; the load
  task turns it into rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

log = logging.getLogger(__name__)

STAGING_VERSION = 1
# One detection row as staged: class, confidence, pixel box (x1, y1, x2, y2) in the full-size
# image, normalised centre box (xc, yc, w, h) exactly as written to the txt file.
DET_FIELDS = ("cls", "conf", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h")


class OutputPathError(ValueError):
    """A file name would place an output outside the output root."""


class OutputWriteError(OSError):
    """An output file cannot be written (folder not writable, disk full, read-only file system).

    One line naming the file and the system's reason (plus, for a permission or not-a-folder
    problem, which existing path is in the way); ``errno`` is the original one, which is
    chained as ``__cause__``. Raised instead of a bare OSError, whose text often lacks the
    path ("[Errno 28] No space left on device").
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.filename = str(path)
        message = f"cannot write {path}: {cause.strerror or cause}"
        blocker = _deepest_existing(path.parent)
        if cause.errno in (errno.EACCES, errno.EPERM) and blocker is not None:
            message += f" ({blocker} is not writable by uid {os.geteuid()})"
        elif cause.errno == errno.ENOTDIR and blocker is not None and not blocker.is_dir():
            message += f" ({blocker} is a file, not a folder)"
        self.message = message

    def __str__(self) -> str:
        return self.message


def _deepest_existing(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return candidate
    return None


def format_txt(dets: np.ndarray) -> str:
    """``dets`` rows as DET_FIELDS → the txt body Ultralytics' save_txt would write."""
    lines = []
    for row in dets.tolist():
        line = (int(row[0]), row[6], row[7], row[8], row[9], row[1])
        lines.append(("%g " * len(line)).rstrip() % line)
    return "".join(line + "\n" for line in lines)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    On failure nothing is left behind (no temp file, the old ``path`` untouched) and an
    OSError comes out as :class:`OutputWriteError` naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(path, exc) from exc
        raise


# A temp file names its writer (host, pid): a process killed between open and rename (SIGKILL,
# the OOM killer, a lost node) leaves it behind, and a later attempt, with another pid, must
# tell such a leftover from a live writer's file before deleting it (remove_stale_temps).
_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.\d+\.tmp")
STALE_TEMP_S = 3600.0  # no single output write takes an hour: an older temp file is a leftover


def remove_stale_temps(folder: Path, targets: Collection[str] | None = None) -> int:
    """Delete the temp files that dead writers' atomic_write left in ``folder`` (only those for
    the file names ``targets``, if given); return how many.

    A temp file is deleted only when its writer is certainly gone: a process of this host that
    no longer exists, or (another host's) one not written to for STALE_TEMP_S. A live writer's
    temp file stays: an attempt still running elsewhere is never disturbed.
    """
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    removed = 0
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or (targets is not None and m["target"] not in targets):
            continue
        try:
            old = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S
            if old or (m["host"] == _HOST and not _process_exists(int(m["pid"]))):
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """Where outputs go. ``root/labels/<rel>.txt`` and ``root/annotated/<rel>``, mirroring the
    drop's relative paths; or, with ``beside_images``, ``<image>.txt`` next to each image (the
    original script's layout)."""

    root: Path
    beside_images: bool = False

    def _inside(self, base: Path, rel_path: str, suffix: str | None) -> Path:
        rel = Path(rel_path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise OutputPathError(f"refusing output path for {rel_path!r}: not a plain relative path")
        target = base / (rel.with_suffix(suffix) if suffix is not None else rel)
        if not target.resolve().is_relative_to(base.resolve()):
            raise OutputPathError(f"refusing output path for {rel_path!r}: escapes {base}")
        return target

    def txt_path(self, rel_path: str, image_path: Path) -> Path:
        if self.beside_images:
            return image_path.with_suffix(".txt")
        return self._inside(self.root / "labels", rel_path, ".txt")

    def annotated_path(self, rel_path: str) -> Path:
        return self._inside(self.root / "annotated", rel_path, ".jpg")


def draw_annotations(image: np.ndarray, dets: np.ndarray, names: dict[int, str],
                     scale: tuple[float, float] = (1.0, 1.0), inplace: bool = False) -> np.ndarray:
    """Boxes and labels drawn on ``image`` (whose pixels are ``scale`` x full size); on a copy
    unless ``inplace``."""
    if image.ndim == 2 or image.shape[2] == 1:
        out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    else:
        out = image if inplace else image.copy()
    thickness = max(2, round(max(out.shape[:2]) / 1500))
    palette = ((56, 56, 255), (255, 157, 151), (31, 112, 255), (29, 178, 255), (49, 210, 207))
    for row in dets.tolist():
        cls, conf = int(row[0]), row[1]
        x1, y1, x2, y2 = (round(row[2] * scale[0]), round(row[3] * scale[1]),
                          round(row[4] * scale[0]), round(row[5] * scale[1]))
        color = palette[cls % len(palette)]
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        label = f"{names.get(cls, cls)} {conf:.2f}"
        font_scale = thickness / 3
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = max(y1 - th - 4, 0)
        cv2.rectangle(out, (x1, top), (x1 + tw + 4, top + th + 4), color, -1)
        cv2.putText(out, label, (x1 + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    return out


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding of an annotated image failed")
    return buf.tobytes()


# --- staged rows ---------------------------------------------------------------------------

def image_record(rel_path: str, *, status: str, bytes_: int, width: int, height: int,
                 error: str | None, dets: np.ndarray | None) -> dict[str, Any]:
    return {"rel_path": rel_path, "status": status, "bytes": bytes_, "width": width,
            "height": height, "error": error,
            "detections": [] if dets is None else dets.tolist()}


class StagingWriter:
    """Append-only JSONL of finished images for one shard, flushed line by line.

    The first line is a header with the result fingerprint; an existing file with another
    fingerprint (other model or settings) is discarded rather than resumed.
    """

    def __init__(self, path: Path, fingerprint: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.meta = meta
        self._f: BinaryIO | None = None

    def resume(self) -> dict[str, dict[str, Any]]:
        """Open for appending; returns the records already staged by an earlier attempt."""
        # The run folder: temp files of a killed attempt (this file's, the shard report's...).
        remove_stale_temps(self.path.parent)
        done: dict[str, dict[str, Any]] = {}
        try:
            header, records = read_staging(self.path) if self.path.exists() else (None, [])
        except (ValueError, UnicodeDecodeError) as exc:
            # Corrupt beyond a torn last line: redo the shard rather than guess, and say so.
            log.warning("staging file %s cannot be read (%s): its images are done again",
                        self.path, exc)
            header, records = None, []
        if header is not None and header.get("fingerprint") != self.fingerprint:
            log.info("staging file %s was made with other weights or settings (fingerprint %s, "
                     "now %s): its %d image(s) are done again", self.path,
                     header.get("fingerprint"), self.fingerprint, len(records))
        if header is not None and header.get("fingerprint") == self.fingerprint:
            done = {r["rel_path"]: r for r in records}
            # Rewrite only the complete lines: a line cut by a crash must not stay in the file.
            self._rewrite(header, list(done.values()))
        else:
            self._rewrite({"kind": "header", "version": STAGING_VERSION,
                           "fingerprint": self.fingerprint, **self.meta}, [])
        # Unbuffered: a write that fails (disk full) leaves no rest in a buffer for close() to
        # retry and fail on again, masking the first error; a torn line is dropped on resume.
        try:
            self._f = open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise OutputWriteError(self.path, exc) from exc
        return done

    def _rewrite(self, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *records])
        atomic_write(self.path, body)

    def append(self, record: dict[str, Any]) -> None:
        assert self._f is not None, "resume() opens the staging file"
        # Straight to the kernel: survives a killed process (the page cache keeps it).
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode())
        try:
            while data:
                data = data[self._f.write(data):]
        except OSError as exc:
            raise OutputWriteError(self.path, exc) from exc

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_staging_header(path: Path) -> dict[str, Any] | None:
    """Just the header line of a staging file (model, settings fingerprint, class names)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        obj = json.loads(first) if first.endswith("\n") else None
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == "header" else None


def staging_line(line: str, path: Path, number: int) -> dict[str, Any]:
    """One complete line of a staging file: a header or an image record (with a text
    rel_path); ValueError naming the file and the line otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"staging file {path} is corrupt at line {number}: {exc}") from None
    if not isinstance(obj, dict) or not (obj.get("kind") == "header"
                                         or isinstance(obj.get("rel_path"), str)):
        raise ValueError(f"staging file {path} is corrupt at line {number}: neither a header "
                         "nor an image record")
    return obj


def read_staging(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and complete records of a staging file; a torn last line is ignored.

    Later records for the same image win (a retried failure appends a new line).
    """
    header: dict[str, Any] | None = None
    latest: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn write from a killed process: only ever the last line
            obj = staging_line(line, path, number)
            if obj.get("kind") == "header":
                header = obj
            else:
                latest[obj["rel_path"]] = obj
    return header, list(latest.values())
