"""The staging file: what a worker stages per image, read back by a retried shard and the load.

JSON lines, appended to the shard's file as each image completes: a header (result
fingerprint, model sha256, class names...), then one record per image (status, size,
detections). A later line for the same image wins (a retried failure appends a new line) and
a torn last line (a killed writer) is ignored. Two readers share that line loop:

- ``read_staging``: plain dicts, for a retried shard (what is already done) and tests;
- ``read_staged``: checked rows for the database. Each line is decoded by msgspec into the
  worker's record shape, which checks types, ten numbers per detection and a class index first
  as it decodes. A line it refuses is read again by ``json.loads`` and checked here in Python,
  which either accepts it (JSON that shape does not cover: NaN in a failed image's detections,
  extra header lines) or names the file, the image and what is wrong. Both read a number as
  the same double.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, get_args

import msgspec
import numpy as np

from image_etl.atomic_files import OutputWriteError, atomic_write, remove_stale_temps

log = logging.getLogger(__name__)

STAGING_VERSION = 1
# One detection row as staged: class, confidence, pixel box (x1, y1, x2, y2) in the full-size
# image, normalised centre box (xc, yc, w, h) exactly as written to the txt file.
DET_FIELDS = ("cls", "conf", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h")


# --- writing ---------------------------------------------------------------------------------

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


# --- reading: the line loop both readers share -------------------------------------------------

# A decoded line: (None, header) or (rel_path, record).
_Decode = Callable[[str, Path, int], tuple[str | None, Any]]


def _latest(path: Path, decode: _Decode) -> tuple[dict[str, Any] | None, list[Any]]:
    """The header and the latest record of each image; a torn last line is ignored."""
    header: dict[str, Any] | None = None
    latest: dict[str, Any] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn write from a killed process: only ever the last line
            key, value = decode(line, path, number)
            if key is None:
                header = value
            else:
                latest[key] = value
    return header, list(latest.values())


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


def _json_line(line: str, path: Path, number: int) -> tuple[str | None, dict[str, Any]]:
    obj = staging_line(line, path, number)
    return (None, obj) if obj.get("kind") == "header" else (obj["rel_path"], obj)


def read_staging(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and complete records of a staging file, as plain dicts; a torn last line is
    ignored and later records for the same image win."""
    return _latest(path, _json_line)


def read_staging_header(path: Path) -> dict[str, Any] | None:
    """Just the header line of a staging file (model, settings fingerprint, class names)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        obj = json.loads(first) if first.endswith("\n") else None
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and obj.get("kind") == "header" else None


# --- reading for the database: checked rows ------------------------------------------------------

_INT32_MAX = 2**31 - 1  # class_id is an INTEGER column

_ClassIndex = Annotated[float, msgspec.Meta(ge=0, multiple_of=1)]
_Detection = tuple[_ClassIndex, float, float, float, float, float, float, float, float, float]
assert len(get_args(_Detection)) == len(DET_FIELDS)


class _Record(msgspec.Struct):
    """A record line as the worker writes it (``image_record``)."""

    rel_path: str
    status: Literal["ok", "failed"]
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    detections: list[_Detection] | None = None
    kind: None = None  # a line with a kind (a header) is not a record


_DECODER = msgspec.json.Decoder(_Record)

# An image's row: rel_path, bytes, width, height, status, error.
ImageRow = tuple[str, int | None, int | None, int | None, str, str | None]


@dataclasses.dataclass
class StagedFile:
    """A staging file's images (later lines won) and their detections, checked."""

    path: Path
    images: list[ImageRow]
    counts: np.ndarray  # detections per image, in images' order (0 for a failed image)
    detections: np.ndarray  # float64, (counts.sum(), len(DET_FIELDS)): DET_FIELDS order


def read_header(path: Path) -> dict[str, Any]:
    """A staging file's header line; ValueError naming the file if it has none."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        header = json.loads(first)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"staging file {path}: cannot read its header: {e}") from None
    if not isinstance(header, dict) or header.get("kind") != "header":
        raise ValueError(f"staging file {path} has no header")
    sha = header.get("model_sha256")
    if not isinstance(sha, str) or not sha:
        raise ValueError(f"staging file {path}: header has no model_sha256")
    return header


def read_headers(staging_files: list[Path]) -> dict[Path, dict[str, Any]]:
    """Every file's header; ValueError unless they were all made by one model."""
    headers = {Path(p): read_header(Path(p)) for p in staging_files}
    by_model: dict[str, list[str]] = {}
    for path, header in headers.items():
        by_model.setdefault(header["model_sha256"], []).append(str(path))
    if len(by_model) > 1:
        detail = "; ".join(f"{sha[:12]}… in {', '.join(paths)}" for sha, paths in by_model.items())
        raise ValueError(f"staging files were made by different models: {detail}")
    if len(headers) != len(staging_files):
        raise ValueError("the same staging file is listed twice")
    return headers


def read_staged(path: Path, sha: str) -> StagedFile:
    """The file's checked images and detections; ValueError naming the file and what is wrong."""
    header, records = _latest(path, _typed_line)
    if header is None or header.get("model_sha256") != sha:
        raise ValueError(f"staging file {path}: header changed while loading")
    images: list[ImageRow] = []
    rows: list[array.array] = []
    try:
        for record in records:
            image, dets = _checked(record) if isinstance(record, dict) else _typed(*record)
            images.append(image)
            rows.append(dets)
        width = len(DET_FIELDS)
        counts = np.fromiter((len(r) // width for r in rows), dtype=np.int64, count=len(rows))
        detections = np.frombuffer(b"".join(rows), dtype=np.float64).reshape(-1, width)
        _check_class_ids(images, counts, detections)
    except ValueError as e:
        raise ValueError(f"staging file {path}: {e}") from None
    return StagedFile(path, images, counts, detections)


def _typed_line(line: str, path: Path, number: int) -> tuple[str | None, Any]:
    """A record line decoded by msgspec (with its detections' numbers), else by json.loads."""
    try:
        record = _DECODER.decode(line)
    except msgspec.DecodeError:  # also a ValidationError: not the worker's shape
        return _json_line(line, path, number)
    # 8 bytes a number, not a Python float each: a shard may stage millions of them.
    numbers = array.array("d", itertools.chain.from_iterable(record.detections or ()))
    record.detections = None
    return record.rel_path, (record, numbers)


def _typed(record: _Record, numbers: array.array) -> tuple[ImageRow, array.array]:
    """A record msgspec has checked: only what its types cannot say is left to check."""
    image = _image(record.rel_path, record.bytes, record.width, record.height, record.status,
                   record.error)
    return image, numbers if record.status == "ok" else array.array("d")


def _checked(record: dict[str, Any]) -> tuple[ImageRow, array.array]:
    """Any other record, checked value by value (the messages name what is wrong)."""
    rel_path: str = record["rel_path"]  # text: staging_line saw to it
    status = record.get("status")
    if status not in ("ok", "failed"):
        raise ValueError(f"{rel_path!r}: status must be 'ok' or 'failed', got {status!r}")
    error = record.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"{rel_path!r}: error must be text, got {error!r}")
    image = _image(rel_path, _int_or_none(record.get("bytes"), f"{rel_path!r}: bytes"),
                   _int_or_none(record.get("width"), f"{rel_path!r}: width"),
                   _int_or_none(record.get("height"), f"{rel_path!r}: height"), status, error)
    if status != "ok":  # a failed image has no detections, whatever was staged with it
        return image, array.array("d")
    raw = record.get("detections") or []
    if not isinstance(raw, list):
        raise ValueError(f"{rel_path!r}: detections must be a list")
    return image, _det_values(raw, rel_path)


def _image(rel_path: str, bytes_: int | None, width: int | None, height: int | None,
           status: str, error: str | None) -> ImageRow:
    if not rel_path or "\x00" in rel_path:
        raise ValueError(f"bad rel_path {rel_path!r}")
    if error is not None:
        error = error.replace("\x00", "\\x00")  # text columns cannot hold NUL
    return rel_path, bytes_, width, height, status, error


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return value


def _det_values(raw: list[Any], rel_path: str) -> array.array:
    """Staged detection rows' numbers, checked: len(DET_FIELDS) finite numbers a row, a class
    index first."""
    width = len(DET_FIELDS)
    for i, row in enumerate(raw):
        what = f"{rel_path!r}: detection {i}"
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"{what}: expected {width} numbers {DET_FIELDS}, got {row!r}")
        for value, name in zip(row, DET_FIELDS):
            _finite(value, f"{what}: {name}")
        if row[0] < 0 or row[0] != int(row[0]):
            raise ValueError(f"{what}: cls must be a class index, got {row[0]!r}")
    return array.array("d", (float(v) for row in raw for v in row))


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any double
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _check_class_ids(images: list[ImageRow], counts: np.ndarray, detections: np.ndarray) -> None:
    """A class index must also fit the class_id column."""
    big = np.flatnonzero(detections[:, 0] > _INT32_MAX)
    if big.size:
        k = int(big[0])
        image = int(np.searchsorted(np.cumsum(counts), k, side="right"))
        i = k - int(counts[:image].sum())
        raise ValueError(f"{images[image][0]!r}: detection {i}: cls must be a class index, "
                         f"got {detections[k, 0]!r}")
