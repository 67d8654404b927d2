"""PostgreSQL ``COPY ... FROM STDIN`` on the connection (and transaction) SQLAlchemy holds.

The images go to their stage table as CSV (text fields); the detections go straight into
``detections`` in COPY's binary format, each number as the 8 bytes of its double, so what
the staging file held is what the table holds, bit for bit, and the server parses no text.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any

import numpy as np
from sqlalchemy import Connection, Table

from image_etl.store.schema import DET_COLS, detections

# Binary COPY: a signature, flags and header-extension length; a field count of -1 ends it.
_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_BINARY_TRAILER = struct.pack("!h", -1)
DETECTION_COLUMNS = tuple(c.name for c in detections.columns)
assert DETECTION_COLUMNS == ("image_id", "det_index", "class_id", "class_name", *DET_COLS)
_CSV_READ_SIZE = 1 << 16


def copy_csv(conn: Connection, table: Table, rows: Iterable[Sequence[Any]]) -> None:
    """COPY ``rows`` (one value per column of ``table``, in order) into ``table`` as CSV."""
    cols = ", ".join(c.name for c in table.columns)
    _copy(conn, f"COPY {table.name} ({cols}) FROM STDIN WITH (FORMAT csv)",
          _Reader(_csv_lines(rows)), _CSV_READ_SIZE)


def copy_detections(conn: Connection, chunks: Iterable[bytes]) -> None:
    """COPY binary rows (see :func:`detection_rows`) into ``detections``."""
    def stream() -> Iterator[bytes]:
        yield _BINARY_HEADER
        yield from chunks
        yield _BINARY_TRAILER

    _copy(conn, f"COPY detections ({', '.join(DETECTION_COLUMNS)}) FROM STDIN WITH (FORMAT binary)",
          _Reader(stream()), 1 << 20)


def detection_rows(image_id: np.ndarray, det_index: np.ndarray, class_id: np.ndarray,
                   values: np.ndarray, names: dict[int, str]) -> bytes:
    """Binary COPY rows of DETECTION_COLUMNS; ``values`` holds the DET_COLS, one row each.

    A row's layout depends only on its class name's length, so the rows are written class by
    class as numpy records (row order does not matter to a table).
    """
    out = []
    for cls in np.unique(class_id).tolist():
        rows = np.flatnonzero(class_id == cls)
        name = names.get(cls, str(cls)).encode()
        record = np.empty(len(rows), dtype=_row_dtype(len(name)))
        for field in record.dtype.names:  # every value's length, before the value
            if field.endswith("_len"):
                record[field] = record.dtype[field[:-len("_len")]].itemsize
        record["fields"] = len(DETECTION_COLUMNS)
        record["image_id"] = image_id[rows]
        record["det_index"] = det_index[rows]
        record["class_id"] = cls
        if name:
            record["class_name"] = name
        for j, col in enumerate(DET_COLS):
            record[col] = values[rows, j]
        out.append(record.tobytes())
    return b"".join(out)


@cache
def _row_dtype(name_bytes: int) -> np.dtype:
    """One detections row in binary COPY: a field count, then each field's length and value."""
    kinds = {"image_id": ">i8", "det_index": ">i4", "class_id": ">i4",
             "class_name": f"S{name_bytes}" if name_bytes else "V0"}
    fields: list[tuple[str, str]] = [("fields", ">i2")]
    for col in DETECTION_COLUMNS:
        fields += [(f"{col}_len", ">i4"), (col, kinds.get(col, ">f8"))]
    return np.dtype(fields)


def _copy(conn: Connection, sql: str, reader: _Reader, size: int) -> None:
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cur = dbapi.cursor()
    try:
        cur.copy_expert(sql, reader, size=size)
    except dbapi.Error as e:
        if reader.error is not None:  # psycopg2 reports it as "COPY from stdin failed"
            raise reader.error from None
        _keep_libpq_message(dbapi, e)
        raise
    finally:
        cur.close()


def _keep_libpq_message(dbapi: Any, error: BaseException) -> None:
    """A COPY whose connection died fails with psycopg2's bare "invalid socket"; libpq's message
    says why ("FATAL: terminating connection due to administrator command"): keep it for
    write_transaction's error."""
    if getattr(dbapi, "closed", 0):
        with contextlib.suppress(Exception):
            error.libpq_message = dbapi.info.error_message  # type: ignore[attr-defined]


class _Reader:
    """A read-only file over chunks (str or bytes: COPY takes whatever ``read`` returns); keeps
    the exception that ended it, which psycopg2 would only name in a QueryCanceled."""

    def __init__(self, chunks: Iterable[Any]) -> None:
        self._chunks = iter(chunks)
        self.error: Exception | None = None

    def read(self, size: int = -1) -> Any:
        try:
            return next(self._chunks, b"")
        except Exception as e:
            self.error = e
            raise


def _csv_lines(rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """CSV text, a few lines at a time."""
    batch: list[str] = []
    for row in rows:
        batch.append(",".join(map(_csv_field, row)) + "\n")
        if len(batch) == 1000:
            yield "".join(batch)
            batch = []
    if batch:
        yield "".join(batch)


def _csv_field(value: Any) -> str:
    # NULL is an empty unquoted field and every text value is quoted, so '' and NULL stay
    # apart (Python 3.11's csv module cannot write that distinction: QUOTE_NOTNULL is 3.12+).
    # Inside quotes only '"' is special in PostgreSQL's CSV; newlines, tabs, commas and
    # backslashes go through as they are.
    if value is None:
        return ""
    if isinstance(value, str):
        return '"' + value.replace('"', '""') + '"'
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same double
    return str(int(value))
