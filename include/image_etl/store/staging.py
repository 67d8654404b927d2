"""Staging files → checked rows, the same way for every database.

A staging file (``outputs.StagingWriter``) is JSON lines: a header, then one record per image;
a later line for the same image wins and a torn last line is ignored (as in
``outputs.read_staging``). Each line is decoded by msgspec into the worker's record shape,
which checks types, ten numbers per detection and a class index first as it decodes. A line
it refuses is read again by ``json.loads`` and checked here in Python, which either accepts
it (JSON that shape does not cover: NaN in a failed image's detections, extra header lines)
or names the file, the image and what is wrong. Both read a number as the same double.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import numpy as np

from image_etl.outputs import DET_FIELDS, staging_line

_INT32_MAX = 2**31 - 1  # class_id is an INTEGER column

_ClassIndex = Annotated[float, msgspec.Meta(ge=0, multiple_of=1)]
_Detection = tuple[_ClassIndex, float, float, float, float, float, float, float, float, float]
assert len(get_args(_Detection)) == len(DET_FIELDS)


class _Record(msgspec.Struct):
    """A record line as the worker writes it (``outputs.image_record``)."""

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
    header, records = _read_lines(path)
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


# A record line: decoded by msgspec (with its detections' numbers), or by json.loads.
_Line = tuple[_Record, array.array] | dict[str, Any]


def _read_lines(path: Path) -> tuple[dict[str, Any] | None, list[_Line]]:
    """The header and the latest record of each image, as ``outputs.read_staging`` reads them."""
    header: dict[str, Any] | None = None
    latest: dict[str, _Line] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn write from a killed process: only ever the last line
            try:
                record = _DECODER.decode(line)
            except msgspec.DecodeError:  # also a ValidationError: not the worker's shape
                obj = staging_line(line, path, number)
                if obj.get("kind") == "header":
                    header = obj
                else:
                    latest[obj["rel_path"]] = obj
                continue
            # 8 bytes a number, not a Python float each: a shard may stage millions of them.
            numbers = array.array("d", itertools.chain.from_iterable(record.detections or ()))
            record.detections = None
            latest[record.rel_path] = record, numbers
    return header, list(latest.values())


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
