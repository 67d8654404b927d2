"""Loads: staging files → rows, one transaction per load, replacing what was loaded before."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Date,
    DateTime,
    Double,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    literal,
    select,
    true,
)

from image_etl.outputs import DET_FIELDS, read_staging
from image_etl.store.engine import dialect_insert, in_transaction, write_transaction
from image_etl.store.schema import DET_COLS, detections, images, models, runs

log = logging.getLogger(__name__)

# pg_advisory_xact_lock namespace of loads (ASCII "imge").
_PG_LOCK_LOAD_NS = 0x696D6765
_COPY_CHUNK_ROWS = 50_000


# --- models, runs -----------------------------------------------------------------------------

def _names_json(names: dict[int, str]) -> str:
    return json.dumps({str(int(k)): str(v) for k, v in sorted(names.items())}, ensure_ascii=False)


def upsert_model(conn_or_engine: Connection | Engine, sha256: str, path: str,
                 names: dict[int, str] | None) -> None:
    """Insert or update the model's row; ``first_seen`` stays as first written.

    ``names`` None keeps the class names already stored (``{}`` for a new row).
    """
    _check_sha(sha256)
    with in_transaction(conn_or_engine) as conn:
        stmt = dialect_insert(conn, models).values(
            sha256=sha256, name=Path(path).name if path else None, path=path or None,
            class_names=_names_json(names or {}), first_seen=_now())
        # An empty path (a staging header without one) keeps the stored path.
        update: dict[str, Any] = {"name": func.coalesce(stmt.excluded.name, models.c.name),
                                  "path": func.coalesce(stmt.excluded.path, models.c.path)}
        if names is not None:
            update["class_names"] = stmt.excluded.class_names
        conn.execute(stmt.on_conflict_do_update(index_elements=[models.c.sha256], set_=update))


def _check_sha(sha256: str) -> None:
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"model sha256 must be 64 lowercase hex digits, got {sha256!r}")


def model_names(conn: Connection, sha256: str) -> dict[int, str] | None:
    """The class names stored for a model, or None when the model is unknown."""
    text = conn.execute(select(models.c.class_names).where(models.c.sha256 == sha256)).scalar()
    return None if text is None else {int(k): v for k, v in json.loads(text).items()}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
# --- load -------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunInfo:
    """The DAG run a load belongs to; ``run_key`` is its identity in ``runs``."""

    run_key: str
    dag_id: str
    run_id: str
    drop_date: dt.date
    settings: dict[str, Any]
    infer_seconds: float = 0.0


@dataclasses.dataclass
class LoadReport:
    images: int
    ok: int
    failed: int
    detections: int
    seconds: float
    rows_per_s: float


_STAGE = MetaData()
_stage_images = Table(
    "image_etl_stage_images", _STAGE,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("rel_path", Text, nullable=False),
    Column("bytes", BigInteger),
    Column("width", Integer),
    Column("height", Integer),
    Column("status", Text, nullable=False),
    Column("error", Text),
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)
_stage_dets = Table(
    "image_etl_stage_detections", _STAGE,
    Column("seq", Integer, nullable=False),
    Column("det_index", Integer, nullable=False),
    Column("class_id", Integer, nullable=False),
    Column("class_name", Text, nullable=False),
    Column("confidence", Double, nullable=False),
    *(Column(c, Double, nullable=False) for c in ("x1", "y1", "x2", "y2", "xc", "yc", "w", "h")),
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)
def _read_header(path: Path) -> dict[str, Any]:
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


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return value


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


_NUMBER_TYPES = {int, float}


def _det_values(raw: list[Any], rel_path: str) -> list[tuple[int, list[float]]]:
    """Staged detection rows → (class id, the nine numbers after it), checked: every row has
    len(DET_FIELDS) finite numbers and a whole, non-negative class."""
    width = len(DET_FIELDS)
    if (all(type(row) is list and len(row) == width for row in raw)
            and {type(v) for row in raw for v in row} <= _NUMBER_TYPES):
        arr = np.asarray(raw, dtype=np.float64)
        cls = arr[:, 0]
        if np.isfinite(arr).all() and (cls >= 0).all() and (cls == np.floor(cls)).all():
            return [(int(row[0]), row[1:]) for row in arr.tolist()]
    # Something is wrong: find the first bad value for a precise message.
    for i, row in enumerate(raw):
        what = f"{rel_path!r}: detection {i}"
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"{what}: expected {width} numbers {DET_FIELDS}, got {row!r}")
        for value, name in zip(row, DET_FIELDS):
            _finite(value, f"{what}: {name}")
        if row[0] < 0 or row[0] != int(row[0]):
            raise ValueError(f"{what}: cls must be a class index, got {row[0]!r}")
    raise AssertionError("unreachable: a detection failed the fast check but no value is bad")


def _image_row(record: dict[str, Any], seq: int) -> tuple[Any, ...]:
    """One staged record → its stage_images row (validated); the detections are not looked at."""
    rel_path = record.get("rel_path")
    if not isinstance(rel_path, str) or not rel_path or "\x00" in rel_path:
        raise ValueError(f"bad rel_path {rel_path!r}")
    status = record.get("status")
    if status not in ("ok", "failed"):
        raise ValueError(f"{rel_path!r}: status must be 'ok' or 'failed', got {status!r}")
    error = record.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"{rel_path!r}: error must be text, got {error!r}")
    if error is not None:
        error = error.replace("\x00", "\\x00")  # text columns cannot hold NUL
    return (seq, rel_path, _int_or_none(record.get("bytes"), f"{rel_path!r}: bytes"),
            _int_or_none(record.get("width"), f"{rel_path!r}: width"),
            _int_or_none(record.get("height"), f"{rel_path!r}: height"), status, error)


def _record_rows(record: dict[str, Any], seq: int, names: dict[int, str]
                 ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """One staged record → its stage_images row and stage_detections rows (validated)."""
    image = _image_row(record, seq)
    rel_path, status = image[1], image[5]
    dets: list[tuple[Any, ...]] = []
    if status == "ok":  # a failed image has no detections, whatever was staged with it
        raw = record.get("detections") or []
        if not isinstance(raw, list):
            raise ValueError(f"{rel_path!r}: detections must be a list")
        if raw:
            for i, (class_id, values) in enumerate(_det_values(raw, rel_path)):
                dets.append((seq, i, class_id, names.get(class_id, str(class_id)), *values))
    return image, dets
def _csv_field(value: Any) -> str:
    # NULL is an empty unquoted field and every text value is quoted, so '' and NULL stay
    # apart (Python 3.11's csv module cannot write that distinction: QUOTE_NOTNULL is 3.12+).
    # Inside quotes only '"' is special in PostgreSQL's CSV; newlines, tabs, commas and
    # backslashes go through as they are.
    if value is None:
        return ""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same double
    return str(int(value))


def _csv_line(row: Sequence[Any]) -> str:
    return ",".join(map(_csv_field, row)) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


class _CsvStream:
    """A read-only text file over rows, encoded as CSV as COPY asks for more."""

    def __init__(self, rows: Iterable[Sequence[Any]]) -> None:
        self._rows = iter(rows)
        self._buf = ""

    def read(self, size: int = -1) -> str:
        parts = [self._buf]
        have = len(self._buf)
        while size < 0 or have < size:
            row = next(self._rows, None)
            if row is None:
                break
            line = _csv_line(row)
            parts.append(line)
            have += len(line)
        data = "".join(parts)
        if size < 0 or len(data) <= size:
            self._buf = ""
            return data
        self._buf = data[size:]
        return data[:size]


def _fill(conn: Connection, table: Table, rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    cols = [c.name for c in table.columns]
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2":
        # The DBAPI connection under this SQLAlchemy connection: same session, same transaction.
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        sql = f"COPY {table.name} ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv)"
        with dbapi.cursor() as cur:
            try:
                cur.copy_expert(sql, _CsvStream(rows), size=65536)
            except dbapi.Error as e:
                _keep_libpq_message(dbapi, e)
                raise
        return
    for start in range(0, len(rows), _COPY_CHUNK_ROWS):
        chunk = rows[start:start + _COPY_CHUNK_ROWS]
        conn.execute(table.insert(), [dict(zip(cols, row)) for row in chunk])
def _create_stage(conn: Connection, *, detections: bool = True) -> None:
    if conn.dialect.name == "sqlite":
        # Temp tables live as long as the pooled connection: start from a clean slate.
        for table in (_stage_dets, _stage_images):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS temp.{table.name}")
    _stage_images.create(conn)
    if detections:
        _stage_dets.create(conn)


def _drop_stage(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":  # PostgreSQL drops them at commit (ON COMMIT DROP)
        _stage_dets.drop(conn)
        _stage_images.drop(conn)


def _staging_headers(staging_files: Sequence[Path]) -> dict[Path, dict[str, Any]]:
    headers = {Path(p): _read_header(Path(p)) for p in staging_files}
    by_model: dict[str, list[str]] = {}
    for path, header in headers.items():
        by_model.setdefault(header["model_sha256"], []).append(str(path))
    if len(by_model) > 1:
        detail = "; ".join(f"{sha[:12]}… in {', '.join(paths)}" for sha, paths in by_model.items())
        raise ValueError(f"staging files were made by different models: {detail}")
    if len(headers) != len(staging_files):
        raise ValueError("the same staging file is listed twice")
    return headers


@dataclasses.dataclass
class _Counts:
    images: int = 0
    ok: int = 0
    failed: int = 0
    detections: int = 0


def load_staged(engine: Engine, staging_files: list[Path], run: RunInfo,
                names: dict[int, str] | None = None) -> LoadReport:
    """Load shards' staging files as one transaction; return what was loaded.

    Upserts the model and the run, then for every staged image replaces its row (the id is
    kept) and all its detections. Anything failing rolls the whole load back. ``names`` are
    the model's class names (stored with the model); None uses those already stored.
    """
    started = time.perf_counter()
    files = [Path(p) for p in staging_files]
    headers = _staging_headers(files)
    sha = next(iter(headers.values()))["model_sha256"] if headers else None
    model_path = next(iter(headers.values())).get("model_path") if headers else None
    counts = _Counts()
    with write_transaction(engine) as conn:
        is_pg = conn.dialect.name == "postgresql"
        now = _now()
        if sha is not None:
            if is_pg:  # two loads of the same model and date take turns
                conn.execute(select(func.pg_advisory_xact_lock(
                    _PG_LOCK_LOAD_NS, func.hashtext(f"{sha}/{run.drop_date.isoformat()}"))))
            upsert_model(conn, sha, str(model_path or ""), names)
            if names is None:
                names = model_names(conn, sha) or {}
        if sha is not None and files:
            if is_pg and conn.dialect.driver == "psycopg2":
                counts = _load_postgresql(conn, files, sha, run, names or {}, now)
            else:
                counts = _load_rows(conn, files, sha, run, names or {}, now)
        _upsert_run(conn, run, sha, now, images=counts.images, ok=counts.ok,
                    failed=counts.failed, detections=counts.detections)
    seconds = time.perf_counter() - started
    n_images, n_dets = counts.images, counts.detections
    report = LoadReport(images=n_images, ok=counts.ok, failed=counts.failed, detections=n_dets,
                        seconds=seconds,
                        rows_per_s=(n_images + n_dets) / seconds if seconds > 0 else 0.0)
    log.info("loaded %d images (%d ok, %d failed), %d detections for %s in %.2fs (%.0f rows/s)",
             n_images, counts.ok, counts.failed, n_dets, run.run_key, seconds, report.rows_per_s)
    return report


def _load_rows(conn: Connection, files: list[Path], sha: str, run: RunInfo,
               names: dict[int, str], now: dt.datetime) -> _Counts:
    """The portable load (SQLite): every record parsed and checked in Python, rows inserted
    into the stage tables, then the set-based replace."""
    counts = _Counts()
    _create_stage(conn)
    seen: dict[str, Path] = {}
    for path in files:
        header, records = read_staging(path)  # strict: a corrupt line before the last raises
        if header is None or header.get("model_sha256") != sha:
            raise ValueError(f"staging file {path}: header changed while loading")
        image_rows: list[tuple[Any, ...]] = []
        det_rows: list[tuple[Any, ...]] = []
        for record in records:
            try:
                image, dets = _record_rows(record, counts.images, names)
            except ValueError as e:
                raise ValueError(f"staging file {path}: {e}") from None
            _check_once(seen, image[1], path)
            image_rows.append(image)
            det_rows.extend(dets)
            _count(counts, image, len(dets))
        _fill(conn, _stage_images, image_rows)
        _fill(conn, _stage_dets, det_rows)
        del image_rows, det_rows
    if counts.images:
        _upsert_images(conn, sha, run, now)
        _delete_staged_detections(conn, sha, run)
        _insert_staged_detections(conn, sha, run)
    _drop_stage(conn)
    return counts


def _check_once(seen: dict[str, Path], rel_path: str, path: Path) -> None:
    if rel_path in seen:
        raise ValueError(f"{rel_path!r} is staged in both {seen[rel_path]} and {path}")
    seen[rel_path] = path


def _count(counts: _Counts, image: tuple[Any, ...], n_dets: int) -> None:
    counts.images += 1
    counts.ok += image[5] == "ok"
    counts.failed += image[5] == "failed"
    counts.detections += n_dets

# --- the PostgreSQL load ------------------------------------------------------------------------
#
# Parsing every number of a staging file into a Python float and formatting it back to text
# was most of a load's time. PostgreSQL reads number text itself (float8in rounds correctly,
# like Python's float(): a JSON number's text becomes the same double either way), so for the
# lines a worker writes -- json.dumps(image_record(...)), detections last:
#     {"rel_path": ..., "error": null, "detections": [[0.0, 0.58, ...], [1.0, ...]]}
# each file is read once, only the small head before ', "detections": ' is parsed as JSON
# (and checked as _record_rows checks it), and the detections' text is rearranged into COPY
# text rows (image_id, det_index, class_id, class_name, then the nine numbers as written)
# that are COPYed straight into ``detections`` -- made while COPY runs, so that Python and
# the server work at the same time. Its FOREIGN KEY check, one per row, is most of what is
# left (about half of the server's time).
#
# A file takes that way only if every line has exactly that shape and every number is written
# as JSON writes it (float8in would also take ".5", "5.", "+5" or "05", which json rejects, and
# reads the integer -0 as -0.0; _plain_json_numbers). Otherwise -- and if COPY rejects a row
# (a row of 9 values, "1.2.3") -- the file goes the exact way: read_staging + _record_rows,
# the same checks, messages and rows as the portable load; a rejected COPY is rolled back to
# a savepoint first.

_DETS_KEY = b', "detections": '
# Every byte the detections of canonical lines (joined by newlines) may hold.
_DETS_BYTES = b"0123456789.eE+-[], \n"
_IS_DIGIT = np.zeros(256, dtype=bool)
_IS_DIGIT[ord("0"):ord("9") + 1] = True
_IS_DELIM = np.zeros(256, dtype=bool)
_IS_DELIM[list(b"[], \n")] = True
_COPY_CHUNK_BYTES = 1 << 20
_CHECK_BYTES = 4 << 20
# SQLSTATE classes of errors a COPY of bad data raises: 22 data exception (a number float8in
# cannot read, a missing or extra column), 23 integrity constraint (a CHECK).
_DATA_ERROR_CLASSES = ("22", "23")

# A staged image: its stage_images row, its detections -- COPY text rows without the image_id,
# or (fast way, is_json) the staged JSON text they are made from while COPY runs -- and how many.
_Staged = tuple[tuple[Any, ...], bytes, int, bool]


_Segment = tuple[Path, int, int]  # a file read the fast way: (path, start, stop) in the staged list


class _NotCanonical(Exception):
    """The fast way met detections it does not read (a number not written as JSON writes it,
    a row of other than 10 values, a class that is not a whole number): the exact way reads
    the file (``args[0]``, a _Segment, once known) and says what is wrong, if anything."""


def _load_postgresql(conn: Connection, files: list[Path], sha: str, run: RunInfo,
                     names: dict[int, str], now: dt.datetime) -> _Counts:
    """Stage the images (COPY), upsert them (ids kept) and learn their ids, delete their old
    detections, COPY the new ones straight into ``detections``."""
    staged: list[_Staged] = []
    fast: list[_Segment] = []
    classes: dict[bytes, bytes] = {}  # class token as staged → COPY text of class_id, class_name
    seen: dict[str, Path] = {}
    for path in files:
        part = _staged_fast(path, sha, names, classes, len(staged))
        if part is None:
            part = _staged_exact(path, sha, names, len(staged))
        elif part:
            fast.append((path, len(staged), len(staged) + len(part)))
        for row, *_ in part:
            _check_once(seen, row[1], path)
        staged.extend(part)
    if not staged:
        return _Counts()

    _create_stage(conn, detections=False)
    _fill(conn, _stage_images, [row for row, *_ in staged])
    conn.exec_driver_sql(f"ANALYZE {_stage_images.name}")
    ids = _upsert_images(conn, sha, run, now)
    _delete_staged_detections(conn, sha, run)
    while True:
        savepoint = conn.begin_nested()
        try:
            _copy_detections(conn, staged, fast, ids, names, classes)
        except _NotCanonical as e:
            redo = [e.args[0]]
        except conn.dialect.loaded_dbapi.Error as e:
            if not fast or _sqlstate_class(e) not in _DATA_ERROR_CLASSES:
                raise  # nothing left to read the exact way: the data's own error (a CHECK...)
            redo = list(fast)  # COPY does not say which file's row it refused
        else:
            savepoint.commit()
            break
        # Back to before the COPY; the file(s) go the exact way, which names what is wrong
        # (or finds nothing, and the next COPY meets the same error without the fast way).
        savepoint.rollback()
        for segment in redo:
            path, start, stop = segment
            exact = _staged_exact(path, sha, names, start)
            if [row for row, *_ in exact] != [row for row, *_ in staged[start:stop]]:
                raise ValueError(f"staging file {path} changed while loading")
            staged[start:stop] = exact
            fast.remove(segment)
    counts = _Counts()
    for row, _, n_dets, _ in staged:
        _count(counts, row, n_dets)
    return counts


def _sqlstate_class(error: BaseException) -> str:
    return str(getattr(error, "pgcode", None) or "")[:2]


def _staged_exact(path: Path, sha: str, names: dict[int, str], seq: int) -> list[_Staged]:
    """A staging file through json.loads and _record_rows: every value checked in Python."""
    header, records = read_staging(path)
    if header is None or header.get("model_sha256") != sha:
        raise ValueError(f"staging file {path}: header changed while loading")
    out: list[_Staged] = []
    for k, record in enumerate(records):
        try:
            image, dets = _record_rows(record, seq + k, names)
        except ValueError as e:
            raise ValueError(f"staging file {path}: {e}") from None
        out.append((image, b"".join(map(_det_copy_line, dets)), len(dets), False))
    return out


# A detection row as COPY text, without its image_id: det_index, class_id, class_name and the
# nine doubles (%r: the shortest text that reads back as the same double).
_DET_COPY_LINE = "%d\t%d\t%s" + "\t%r" * len(DET_COLS) + "\n"


def _det_copy_line(row: Sequence[Any]) -> bytes:
    return (_DET_COPY_LINE % (row[1], row[2], _copy_text(row[3]), *row[4:])).encode()


def _copy_text(value: str) -> str:
    """``value`` as a field of COPY's text format (backslash is the escape character)."""
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def _staged_fast(path: Path, sha: str, names: dict[int, str], classes: dict[bytes, bytes],
                 seq: int) -> list[_Staged] | None:
    """A staging file → its records, without parsing the detections' numbers; None when any
    line is not in the worker's exact form (the exact way then reads the file)."""
    data = path.read_bytes()
    if b"\r" in data:  # read_staging reads text: "\r" would end a line there
        return None
    lines = data.split(b"\n")
    del data
    try:
        lines.pop().decode()  # a torn last line is dropped, but read_staging decodes it
        header = json.loads(lines[0].decode()) if len(lines) > 0 else None
    except ValueError:
        return None
    if type(header) is not dict or header.get("kind") != "header" or header.get("model_sha256") != sha:
        return None
    latest: dict[str, tuple[dict[str, Any], bytes]] = {}  # later lines win, like read_staging
    with_dets = 0
    skip = len(_DETS_KEY)
    for line in itertools.islice(lines, 1, None):
        k = line.rfind(_DETS_KEY)
        if k < 0 or line[:1] != b"{" or line[-2:] != b"]}":
            return None
        tail = line[k + skip:-1]
        if tail != b"[]" and (tail[:2] != b"[[" or tail[-2:] != b"]]"):
            return None
        try:  # the head: the object without its last member, the detections
            head = json.loads((line[:k] + b"}").decode())
        except ValueError:
            return None
        if type(head) is not dict or not head or head.get("kind") == "header":
            return None
        rel_path = head.get("rel_path")
        if type(rel_path) is not str:
            return None
        latest[rel_path] = (head, tail)
        with_dets += tail != b"[]"
    out: list[_Staged] = []
    copied = 0
    for head, tail in latest.values():
        try:
            image = _image_row(head, seq + len(out))
        except ValueError:
            return None
        if image[5] == "ok" and tail != b"[]":  # COPY text is made of it (and checked) as COPY reads
            out.append((image, tail, tail.count(b"], [") + 1, True))
            copied += 1
        else:
            out.append((image, b"", 0, False))
    # Detections that COPY does not see (a failed image's, a line a later one replaced) would
    # go unchecked: unless they are empty ("[]"), let json.loads judge them.
    if copied != with_dets:
        return None
    return out


def _dets_copy_text(tail: bytes, names: dict[int, str], classes: dict[bytes, bytes]) -> bytes:
    """``[[cls, conf, ...], ...]`` (canonical JSON) → COPY text rows: det_index, class_id,
    class_name, the nine numbers' text. Raises _NotCanonical if a row is not 10 values or a
    class is not a class index (a row's values are left for COPY to read)."""
    text = tail.replace(b", ", b"\t")
    rows = text[2:-2].split(b"]\t[")
    if text.count(b"\t") != len(rows) * len(DET_FIELDS) - 1:  # 9 tabs a row, 1 between rows
        raise _NotCanonical
    out = []
    for i, row in enumerate(rows):
        cls, _, values = row.partition(b"\t")
        prefix = classes.get(cls)
        if prefix is None:
            prefix = classes[cls] = _class_copy_text(cls, names)
        out.append(b"%d\t%s%s\n" % (i, prefix, values))
    return b"".join(out)


def _class_copy_text(token: bytes, names: dict[int, str]) -> bytes:
    """A staged class number → ``class_id<TAB>class_name<TAB>``; _NotCanonical unless it is a
    JSON number with a whole, non-negative value (as _det_values demands)."""
    try:
        value = json.loads(token)
        number = float(value)
    except (ValueError, TypeError, OverflowError):
        raise _NotCanonical from None
    if type(value) not in _NUMBER_TYPES or not (math.isfinite(number) and number >= 0
                                                and number.is_integer()):
        raise _NotCanonical
    class_id = int(number)
    return b"%d\t%s\t" % (class_id, _copy_text(names.get(class_id, str(class_id))).encode())


def _plain_json_numbers(arrays: Iterable[bytes]) -> bool:
    """True when ``arrays`` -- JSON arrays of numbers -- hold nothing but numbers, brackets,
    commas and spaces, and every number is written the way JSON requires, so that float8in
    reads it as json.loads does (checked a few MB at a time)."""
    piece: list[bytes] = []
    size = 0
    for text in arrays:
        piece.append(text)
        size += len(text)
        if size >= _CHECK_BYTES:
            if not _plain_json_text(b"\n".join(piece)):
                return False
            piece, size = [], 0
    return _plain_json_text(b"\n".join(piece))


def _plain_json_text(text: bytes) -> bool:
    """_plain_json_numbers for arrays joined by newlines. Vectorised: a '.' sits between
    digits; '+' only follows an exponent's 'e'; an exponent has one or two digits (a third
    could under- or overflow, where float8in raises and Python does not); no leading zeros
    ("05"); no "-0" (JSON's integer 0, float8in's -0.0); no run of 20 zeros (underflow)."""
    if text.translate(None, _DETS_BYTES) or b"0" * 20 in text:
        return False
    a = np.frombuffer(b"\n" + text + b"\n\n\n", dtype=np.uint8)  # padded: a[i - 2], a[i + 3] exist
    dot = np.flatnonzero(a == ord("."))
    if not (_IS_DIGIT[a[dot - 1]].all() and _IS_DIGIT[a[dot + 1]].all()):
        return False
    if b"e" in text or b"E" in text:
        exp = np.flatnonzero((a | 0x20) == ord("e"))
        first = exp + 1 + ((a[exp + 1] == ord("+")) | (a[exp + 1] == ord("-")))
        if not (_IS_DIGIT[a[exp - 1]].all() and _IS_DIGIT[a[first]].all()):
            return False
        if (_IS_DIGIT[a[first + 1]] & _IS_DIGIT[a[first + 2]]).any():
            return False
    if b"+" in text and not ((a[np.flatnonzero(a == ord("+")) - 1] | 0x20) == ord("e")).all():
        return False
    zero = np.flatnonzero(a == ord("0"))
    before = a[zero - 1]
    signed = (before == ord("-")) & _IS_DELIM[a[zero - 2]]  # "-0…" at a number's start
    leading = _IS_DELIM[before] | signed
    if (leading & _IS_DIGIT[a[zero + 1]]).any() or (signed & _IS_DELIM[a[zero + 1]]).any():
        return False
    return True


def _copy_detections(conn: Connection, staged: list[_Staged], fast: list[_Segment],
                     ids: dict[str, int], names: dict[int, str], classes: dict[bytes, bytes]
                     ) -> None:
    """COPY the staged detections into ``detections``, each row led by its image's id. The
    rows are made (and a fast-way file's numbers checked) while COPY runs, so the server
    works on one chunk as the next is made."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    sql = f"COPY {detections.name} ({', '.join(c.name for c in detections.columns)}) FROM STDIN"
    reader = _ChunkReader(_detection_chunks(staged, fast, ids, names, classes))
    with dbapi.cursor() as cur:
        try:
            cur.copy_expert(sql, reader, size=_COPY_CHUNK_BYTES)
        except dbapi.Error as e:
            if reader.error is not None:  # psycopg2 reports it as "COPY from stdin failed"
                raise reader.error from None
            _keep_libpq_message(dbapi, e)
            raise


def _keep_libpq_message(dbapi: Any, error: BaseException) -> None:
    """A COPY whose connection died fails with psycopg2's bare "invalid socket"; libpq's message
    says why ("FATAL: terminating connection due to administrator command"): keep it for
    write_transaction's error."""
    if getattr(dbapi, "closed", 0):
        with contextlib.suppress(Exception):
            error.libpq_message = dbapi.info.error_message  # type: ignore[attr-defined]


def _detection_chunks(staged: list[_Staged], fast: list[_Segment], ids: dict[str, int],
                      names: dict[int, str], classes: dict[bytes, bytes]) -> Iterator[bytes]:
    """COPY text of all staged detections; _NotCanonical(segment) when a fast-way file's
    detections are not plain JSON numbers (checked before any of that file's rows are sent)
    or not rows of ten with a class index first."""
    starts = {segment[1]: segment for segment in fast}
    segment = None
    parts: list[bytes] = []
    size = 0
    for k, (image, text, n_dets, is_json) in enumerate(staged):
        if k in starts:
            segment = starts[k]
            if not _plain_json_numbers(tail for _, tail, _, json_text in staged[k:segment[2]]
                                       if json_text):
                raise _NotCanonical(segment)
        if not n_dets:
            continue
        if is_json:
            try:
                text = _dets_copy_text(text, names, classes)
            except _NotCanonical:
                raise _NotCanonical(segment) from None
        lead = b"%d\t" % ids[image[1]]
        rows = lead + text[:-1].replace(b"\n", b"\n" + lead) + b"\n"
        parts.append(rows)
        size += len(rows)
        if size >= _COPY_CHUNK_BYTES:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


class _ChunkReader:
    """A read-only binary file over byte chunks (COPY takes whatever ``read`` returns); keeps
    the exception that ended it, which psycopg2 would only name in a QueryCanceled."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.error: Exception | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return next(self._chunks, b"")
        except Exception as e:
            self.error = e
            raise

def _upsert_run(conn: Connection, run: RunInfo, sha: str | None, now: dt.datetime, *,
                images: int, ok: int, failed: int, detections: int) -> None:
    """The run's row, replaced when the run_key was loaded before."""
    seconds = float(run.infer_seconds or 0.0)
    row = {"run_key": run.run_key, "dag_id": run.dag_id, "run_id": run.run_id,
           "drop_date": run.drop_date, "model_sha256": sha,
           "settings": json.dumps(run.settings, sort_keys=True, default=str),
           "loaded_at": now, "images": images, "ok": ok, "failed": failed,
           "detections": detections, "infer_seconds": seconds,
           "images_per_s": images / seconds if seconds > 0 else None}
    stmt = dialect_insert(conn, runs).values(**row)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[runs.c.run_key],
        set_={k: stmt.excluded[k] for k in row if k != "run_key"}))


def record_empty_run(conn_or_engine: Connection | Engine, run: RunInfo,
                     model_sha256: str | None = None) -> None:
    """A run with nothing to load still gets its ``runs`` row (zero counts): visibly empty.

    An unknown ``model_sha256`` gets a models row without class names (see upsert_model).
    """
    with in_transaction(conn_or_engine) as conn:
        if model_sha256 is not None:
            _check_sha(model_sha256)
            stmt = dialect_insert(conn, models).values(sha256=model_sha256, name=None, path=None,
                                                class_names="{}", first_seen=_now())
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[models.c.sha256]))
        _upsert_run(conn, run, model_sha256, _now(), images=0, ok=0, failed=0, detections=0)


def _staged_identity(sha: str, run: RunInfo) -> Any:
    i, s = images, _stage_images
    return and_(i.c.model_sha256 == sha, i.c.drop_date == run.drop_date, i.c.rel_path == s.c.rel_path)


def _upsert_images(conn: Connection, sha: str, run: RunInfo, now: dt.datetime) -> dict[str, int]:
    """Stage → images, set-based (ids kept, new ones numbered in rel_path order); returns
    rel_path → id of every staged image on PostgreSQL ({} on SQLite, which needs none)."""
    s, i = _stage_images, images
    source = select(
        literal(sha, String(64)), literal(run.drop_date, Date), s.c.rel_path,
        literal(run.run_key, Text), s.c.bytes, s.c.width, s.c.height, s.c.status, s.c.error,
        literal(now, DateTime(timezone=True)),
    ).where(true()).order_by(s.c.rel_path)  # WHERE: SQLite's INSERT…SELECT…ON CONFLICT needs one
    cols = ["model_sha256", "drop_date", "rel_path", "run_key", "bytes", "width", "height",
            "status", "error", "processed_at"]
    stmt = dialect_insert(conn, i).from_select(cols, source)
    stmt = stmt.on_conflict_do_update(
        index_elements=[i.c.model_sha256, i.c.drop_date, i.c.rel_path],
        set_={c: stmt.excluded[c] for c in cols[3:]})
    if conn.dialect.name != "postgresql":
        conn.execute(stmt)
        return {}
    return {rel_path: image_id
            for image_id, rel_path in conn.execute(stmt.returning(i.c.id, i.c.rel_path))}


def _delete_staged_detections(conn: Connection, sha: str, run: RunInfo) -> None:
    staged_ids = select(images.c.id).join(_stage_images, _staged_identity(sha, run))
    conn.execute(delete(detections).where(detections.c.image_id.in_(staged_ids)))


def _insert_staged_detections(conn: Connection, sha: str, run: RunInfo) -> None:
    s, d, i = _stage_images, _stage_dets, images
    det_cols = ["det_index", "class_id", "class_name", *DET_COLS]
    new_dets = (select(i.c.id, *(d.c[c] for c in det_cols))
                .select_from(d.join(s, s.c.seq == d.c.seq).join(i, _staged_identity(sha, run)))
                .where(s.c.status == "ok"))
    conn.execute(detections.insert().from_select(["image_id", *det_cols], new_dets))
