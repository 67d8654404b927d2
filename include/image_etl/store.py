"""The results database: schema, migrations and the idempotent load of staged rows.

SQLAlchemy 2 Core, no ORM. A SQLite file by default (no server needed), PostgreSQL in
production. Identity: a result is (model_sha256, drop_date, rel_path); loading it again
replaces that image's row (same id) and its detections, all in one transaction.

PostgreSQL is filled with ``COPY ... FROM STDIN`` through psycopg2's ``copy_expert`` on the
very connection (and transaction) SQLAlchemy holds: the images into a temp table (then
upserted), the detections straight into ``detections``, their numbers as the staging file
wrote them (see "the PostgreSQL load" below); SQLite with ``executemany``. File names never
become SQL text: they travel as bound parameters or as COPY data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    Date,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    select,
    true,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from image_etl.outputs import DET_FIELDS, read_staging

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 60_000
# pg_advisory_xact_lock keys: one for migrations, one namespace for loads (ASCII "imgetl").
_PG_LOCK_MIGRATE = 0x696D6765746C
_PG_LOCK_LOAD_NS = 0x696D6765
_COPY_CHUNK_ROWS = 50_000


class StoreError(ValueError):
    """The database or its URL cannot be used; the message says which (password hidden)."""


# --- engine ---------------------------------------------------------------------------------

def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for logs and error messages."""
    try:
        text = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        text = str(url)
        # Not parseable by SQLAlchemy: hide whatever sits between "user:" and "@".
        text = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
    # libpq also takes the password as a query parameter.
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", text)


def default_url() -> str:
    """The embedded default: a SQLite file beside Airflow's home (or ~/.image_etl)."""
    home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / ".image_etl")
    return f"sqlite:///{Path(home) / 'image_etl_results.db'}"


def url_from_connection(conn_type: str | None, *, host: str | None = None,
                        port: int | None = None, login: str | None = None,
                        password: str | None = None, schema: str | None = None) -> str:
    """A SQLAlchemy URL from an Airflow Connection's fields (``image_etl_db``).

    Airflow calls PostgreSQL ``postgres``; SQLite connections keep the file path in ``host``.
    """
    kind = (conn_type or "").lower()
    if kind in {"postgres", "postgresql"}:
        url = URL.create("postgresql+psycopg2", username=login or None, password=password or None,
                         host=host or None, port=port or None, database=schema or None)
        return url.render_as_string(hide_password=False)
    if kind == "sqlite":
        path = host or schema
        if not path:
            raise StoreError("image_etl_db: a sqlite connection needs the database file in host")
        return f"sqlite:///{path}"
    raise StoreError(f"image_etl_db: unsupported connection type {conn_type!r}; "
                     "use postgres or sqlite")


def engine_from_url(url: str) -> Engine:
    """An Engine for ``sqlite:///path`` or ``postgresql+psycopg2://...``.

    SQLite: the file's folder is created; every connection gets foreign keys on, WAL and a
    busy timeout, and SQLAlchemy (not the sqlite3 module) emits BEGIN, so DDL is
    transactional too; :func:`write_transaction` begins with ``BEGIN IMMEDIATE``.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise StoreError(f"db_url: cannot parse {redact_url(url)!r}: {e}") from None
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    elif backend == "postgresql":
        if parsed.get_driver_name() == "psycopg2":
            kwargs["client_encoding"] = "utf8"
    else:
        raise StoreError(f"db_url: unsupported database {backend!r} in {redact_url(url)!r}; "
                         "use sqlite:///path or postgresql+psycopg2://...")
    try:
        engine = create_engine(parsed, pool_pre_ping=backend == "postgresql", **kwargs)
    except Exception as e:  # a missing driver etc.: name the URL, never the password
        raise StoreError(f"db_url: cannot create an engine for {redact_url(url)!r}: {e}") from None
    if backend == "sqlite":
        _sqlite_events(engine)
    _connect_errors(engine, url, parsed.password)
    return engine


def _connect_errors(engine: Engine, url: str, password: str | None) -> None:
    """A failed connect (server down, port closed, wrong host or password) raises one line
    naming the database, password hidden, instead of the driver's multi-line text."""

    @event.listens_for(engine, "handle_error")
    def _handle(ctx: Any) -> BaseException | None:
        # Only the connect itself; never a pre-ping (the pool reconnects after those).
        if ctx.connection is not None or ctx.is_pre_ping:
            return None
        reason = _one_line(ctx.original_exception, password)
        return StoreError(f"cannot connect to the results database {redact_url(url)}: {reason}")


def _one_line(error: BaseException | str, password: str | None) -> str:
    """A driver's (multi-line) error text on one line, the password hidden."""
    text = " ".join(str(error).split())
    return text.replace(str(password), "***") if password else text


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN (the sqlite3 module would only begin
        # before DML, leaving DDL and reads outside the transaction).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
            # Switching a new file to WAL needs an exclusive lock and does not wait on the busy
            # timeout: when several processes open a new database at once, retry briefly.
            for attempt in range(100):
                try:
                    cur.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == 99:
                        raise
                    time.sleep(0.05)
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A writer takes the write lock up front: a deferred transaction that reads first
        # and writes later can fail with SQLITE_BUSY instead of waiting for the other writer.
        write = conn.get_execution_options().get("image_etl_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One read-write transaction: committed when the block ends, rolled back if it raises.

    A connection lost inside it (server restarted, network cut) raises one StoreError saying
    so, the driver's first error chained. Without this the error would end in the rollback's
    "connection already closed": the COPYs run on the raw driver connection, out of
    SQLAlchemy's sight, so it only learns of the loss when its rollback fails.
    """
    with engine.connect().execution_options(image_etl_write=True) as conn:
        try:
            with conn.begin():
                yield conn
        except Exception as exc:
            if not conn.invalidated:  # SQLAlchemy invalidates a connection only on a disconnect
                raise
            root = _first_error(exc)
            reason = _one_line(getattr(root, "libpq_message", None) or root, engine.url.password)
            url = redact_url(engine.url.render_as_string(hide_password=False))
            raise StoreError(f"lost the connection to the results database {url} inside a "
                             f"transaction, which did not complete (a retry is safe): "
                             f"{reason}") from root


def _first_error(exc: BaseException) -> BaseException:
    """The error a chain of follow-up failures started with."""
    seen = {id(exc)}
    while (earlier := exc.__cause__ or exc.__context__) is not None and id(earlier) not in seen:
        seen.add(id(earlier))
        exc = earlier
    return exc


@contextlib.contextmanager
def _in_transaction(conn_or_engine: Connection | Engine) -> Iterator[Connection]:
    """Use the caller's connection (and its transaction) or open a write transaction."""
    if isinstance(conn_or_engine, Connection):
        if conn_or_engine.in_transaction():
            yield conn_or_engine
        else:
            with conn_or_engine.begin():
                yield conn_or_engine
    else:
        with write_transaction(conn_or_engine) as conn:
            yield conn


def _insert(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_update``/``do_nothing``."""
    if conn.dialect.name == "postgresql":
        return pg_dialect.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite_dialect.insert(table)
    raise StoreError(f"unsupported database {conn.dialect.name!r}")


# --- schema ---------------------------------------------------------------------------------

def _id_type() -> Any:
    return BigInteger().with_variant(Integer, "sqlite")


def _schema_v1(md: MetaData) -> tuple[Table, Table, Table, Table]:
    models_ = Table(
        "models", md,
        Column("sha256", String(64), primary_key=True),
        Column("name", Text),
        Column("path", Text),
        Column("class_names", Text, nullable=False),  # JSON object {"0": "person", ...}
        Column("first_seen", DateTime(timezone=True), nullable=False),
    )
    runs_ = Table(
        "runs", md,
        Column("run_key", Text, primary_key=True),  # "<dag_id>/<run_id>"
        Column("dag_id", Text),
        Column("run_id", Text),
        Column("drop_date", Date, nullable=False),
        Column("model_sha256", String(64), ForeignKey("models.sha256"), nullable=True),
        Column("settings", Text, nullable=False),  # JSON
        Column("loaded_at", DateTime(timezone=True), nullable=False),
        Column("images", Integer, nullable=False),
        Column("ok", Integer, nullable=False),
        Column("failed", Integer, nullable=False),
        Column("detections", BigInteger, nullable=False),
        Column("infer_seconds", Double, nullable=False),
        Column("images_per_s", Double, nullable=True),  # NULL when the time is unknown
    )
    images_ = Table(
        "images", md,
        Column("id", _id_type(), primary_key=True, autoincrement=True),
        Column("model_sha256", String(64), ForeignKey("models.sha256"), nullable=False),
        Column("drop_date", Date, nullable=False),
        Column("rel_path", Text, nullable=False),
        Column("run_key", Text, nullable=False),
        Column("bytes", BigInteger),
        Column("width", Integer),
        Column("height", Integer),
        Column("status", Text, nullable=False),
        Column("error", Text, nullable=True),
        Column("processed_at", DateTime(timezone=True), nullable=False),
        # Its unique index also serves every lookup by (model_sha256, drop_date): a second
        # index on that prefix would only slow the loads down.
        UniqueConstraint("model_sha256", "drop_date", "rel_path", name="uq_images_identity"),
        CheckConstraint("status IN ('ok', 'failed')", name="ck_images_status"),
    )
    detections_ = Table(
        "detections", md,
        Column("image_id", _id_type(), ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        Column("det_index", Integer, nullable=False),
        Column("class_id", Integer, nullable=False),
        Column("class_name", Text, nullable=False),
        Column("confidence", Double, nullable=False),
        *(Column(c, Double, nullable=False) for c in ("x1", "y1", "x2", "y2")),  # pixels
        *(Column(c, Double, nullable=False) for c in ("xc", "yc", "w", "h")),  # normalised
        PrimaryKeyConstraint("image_id", "det_index", name="pk_detections"),
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="ck_detections_confidence"),
        CheckConstraint("det_index >= 0", name="ck_detections_det_index"),
    )
    return models_, runs_, images_, detections_


def _schema_v2(md: MetaData) -> tuple[Table, Table, Table, Table, Table, Table]:
    """v1, plus: where each image was read and written, the run index, the night totals."""
    models_, runs_, images_, detections_ = _schema_v1(md)
    # The folders of the load that wrote the row: a run key can be re-run for another date
    # (a backfill clearing an earlier run), which replaces its ``runs`` row and settings.
    # NULL for rows loaded before v2 whose run no longer records their drop.
    images_.append_column(Column("drop_dir", Text, nullable=True))
    images_.append_column(Column("output_dir", Text, nullable=True))
    Index("ix_images_run_key", images_.c.run_key)
    # One row per (model, night), kept by every load in its transaction: the UI's nights
    # chart reads 30 rows instead of aggregating 30 nights of detections.
    totals = Table(
        "drop_totals", md,
        Column("model_sha256", String(64), ForeignKey("models.sha256"), nullable=False),
        Column("drop_date", Date, nullable=False),
        Column("images", Integer, nullable=False),
        Column("ok", Integer, nullable=False),
        Column("failed", Integer, nullable=False),
        Column("detections", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        PrimaryKeyConstraint("model_sha256", "drop_date", name="pk_drop_totals"),
    )
    class_totals = Table(
        "drop_class_totals", md,
        Column("model_sha256", String(64), nullable=False),
        Column("drop_date", Date, nullable=False),
        Column("class_name", Text, nullable=False),
        Column("detections", BigInteger, nullable=False),
        PrimaryKeyConstraint("model_sha256", "drop_date", "class_name", name="pk_drop_class_totals"),
        ForeignKeyConstraint(["model_sha256", "drop_date"],
                             ["drop_totals.model_sha256", "drop_totals.drop_date"],
                             ondelete="CASCADE", name="fk_drop_class_totals_night"),
    )
    return models_, runs_, images_, detections_, totals, class_totals


# The current schema, for queries (the migrations below build their own copies).
SCHEMA = MetaData()
models, runs, images, detections, drop_totals, drop_class_totals = _schema_v2(SCHEMA)
schema_version = Table("image_etl_schema_version", MetaData(),
                       Column("version", Integer, primary_key=True, autoincrement=False))


def _migration_1(conn: Connection) -> None:
    md = MetaData()
    for table in _schema_v1(md):
        table.create(conn)


def _migration_2(conn: Connection) -> None:
    """images.drop_dir / output_dir, an index on images.run_key, the night totals; existing
    rows get their folders from their run's settings (when that run still records their
    night) and every existing night its totals."""
    md = MetaData()
    _, runs_, images_, detections_, totals, class_totals = _schema_v2(md)
    for column in ("drop_dir", "output_dir"):
        conn.exec_driver_sql(f"ALTER TABLE images ADD COLUMN {column} TEXT")
    for index in images_.indexes:
        if index.name == "ix_images_run_key":
            index.create(conn)
    totals.create(conn)
    class_totals.create(conn)
    _backfill_folders(conn, runs_, images_)
    _backfill_totals(conn, images_, detections_, totals, class_totals)


def _backfill_folders(conn: Connection, runs_: Table, images_: Table) -> None:
    for run_key, drop_date, sha, text in conn.execute(
            select(runs_.c.run_key, runs_.c.drop_date, runs_.c.model_sha256, runs_.c.settings)):
        try:
            settings = json.loads(text)
        except (TypeError, ValueError):
            continue
        if not isinstance(settings, dict) or not isinstance(settings.get("drop_dir"), str):
            continue
        folders = {c: v if isinstance(v := settings.get(c), str) else None
                   for c in ("drop_dir", "output_dir")}
        # Only the rows of the night the run row describes: others came from another load.
        conn.execute(images_.update().where(
            images_.c.run_key == run_key, images_.c.drop_date == drop_date,
            images_.c.model_sha256 == sha, images_.c.drop_dir.is_(None)).values(**folders))


def _backfill_totals(conn: Connection, images_: Table, detections_: Table, totals: Table,
                     class_totals: Table) -> None:
    i, d = images_, detections_
    night = (i.c.model_sha256, i.c.drop_date)
    conn.execute(totals.insert().from_select(
        ["model_sha256", "drop_date", "images", "ok", "failed", "detections", "updated_at"],
        select(*night, func.count(), _count_if(i.c.status == "ok"),
               _count_if(i.c.status == "failed"), literal(0, BigInteger),
               literal(_now(), DateTime(timezone=True))).group_by(*night)))
    conn.execute(class_totals.insert().from_select(
        ["model_sha256", "drop_date", "class_name", "detections"],
        select(*night, d.c.class_name, func.count()).select_from(d.join(i, i.c.id == d.c.image_id))
        .group_by(*night, d.c.class_name)))
    c = class_totals
    conn.execute(totals.update().values(detections=select(func.coalesce(func.sum(c.c.detections), 0))
                                        .where(c.c.model_sha256 == totals.c.model_sha256,
                                               c.c.drop_date == totals.c.drop_date)
                                        .scalar_subquery()))


def _count_if(condition: Any) -> Any:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


# Ordered: MIGRATIONS[n] takes the schema from version n to n + 1. Append, never edit.
MIGRATIONS: Sequence[Callable[[Connection], None]] = (_migration_1, _migration_2)


def schema_version_of(conn: Connection) -> int:
    """The version recorded in the database; 0 when it was never migrated."""
    if not inspect(conn).has_table(schema_version.name):
        return 0
    return conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one()


def migrate(engine: Engine) -> int:
    """Apply the missing migrations, each in its own transaction; return the schema version.

    Idempotent, and safe when several processes call it at once: on PostgreSQL each step runs
    under a transaction-scoped advisory lock, SQLite serialises writers (BEGIN IMMEDIATE).
    """
    while True:
        with write_transaction(engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_MIGRATE)))
            schema_version.create(conn, checkfirst=True)
            current = schema_version_of(conn)
            if current > len(MIGRATIONS):
                raise StoreError(f"database schema is version {current}, newer than this code "
                                 f"knows ({len(MIGRATIONS)}): upgrade image_etl")
            if current == len(MIGRATIONS):
                return current
            MIGRATIONS[current](conn)
            conn.execute(schema_version.insert().values(version=current + 1))
            log.info("migrated the results database to schema version %d", current + 1)


# --- models, runs -----------------------------------------------------------------------------

def _names_json(names: dict[int, str]) -> str:
    return json.dumps({str(int(k)): str(v) for k, v in sorted(names.items())}, ensure_ascii=False)


def upsert_model(conn_or_engine: Connection | Engine, sha256: str, path: str,
                 names: dict[int, str] | None) -> None:
    """Insert or update the model's row; ``first_seen`` stays as first written.

    ``names`` None keeps the class names already stored (``{}`` for a new row).
    """
    _check_sha(sha256)
    with _in_transaction(conn_or_engine) as conn:
        stmt = _insert(conn, models).values(
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
_DET_COLS = ("confidence", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h")
# DET_FIELDS is (cls, conf, x1..y2, xc..h): everything after cls maps onto _DET_COLS in order.
assert DET_FIELDS[0] == "cls" and DET_FIELDS[1] == "conf" and len(DET_FIELDS) == 1 + len(_DET_COLS)


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
            refresh_drop_totals(conn, sha, run.drop_date, now)
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
_DET_COPY_LINE = "%d\t%d\t%s" + "\t%r" * len(_DET_COLS) + "\n"


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
    stmt = _insert(conn, runs).values(**row)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[runs.c.run_key],
        set_={k: stmt.excluded[k] for k in row if k != "run_key"}))


def record_empty_run(conn_or_engine: Connection | Engine, run: RunInfo,
                     model_sha256: str | None = None) -> None:
    """A run with nothing to load still gets its ``runs`` row (zero counts): visibly empty.

    An unknown ``model_sha256`` gets a models row without class names (see upsert_model).
    """
    with _in_transaction(conn_or_engine) as conn:
        if model_sha256 is not None:
            _check_sha(model_sha256)
            stmt = _insert(conn, models).values(sha256=model_sha256, name=None, path=None,
                                                class_names="{}", first_seen=_now())
            conn.execute(stmt.on_conflict_do_nothing(index_elements=[models.c.sha256]))
        _upsert_run(conn, run, model_sha256, _now(), images=0, ok=0, failed=0, detections=0)


def _setting_text(run: RunInfo, key: str) -> str | None:
    value = run.settings.get(key) if isinstance(run.settings, dict) else None
    return str(value) if value else None


def class_counts(conn: Connection, where: Any, *keys: Any) -> Any:
    """SELECT *keys, class_name, count: the detections of the images matching ``where``.

    On PostgreSQL each image's detections come from a LATERAL probe of ``pk_detections``
    (its OFFSET keeps the planner from flattening it into a join): a plain join is costed as
    a hash join over a scan of every detection, which the planner picks for mid-sized
    histories (10 nights: 230 ms instead of 85).
    """
    i, d = images, detections
    if conn.dialect.name != "postgresql":
        return (select(*keys, d.c.class_name, func.count())
                .select_from(d.join(i, i.c.id == d.c.image_id)).where(where)
                .group_by(*keys, d.c.class_name))
    per_image = (select(d.c.class_name).where(d.c.image_id == i.c.id).offset(0)
                 .lateral("per_image"))
    return (select(*keys, per_image.c.class_name, func.count())
            .select_from(i.join(per_image, true())).where(where)
            .group_by(*keys, per_image.c.class_name))


def refresh_drop_totals(conn: Connection, sha: str, drop_date: dt.date,
                        now: dt.datetime | None = None) -> None:
    """Recount one (model, night) into drop_totals / drop_class_totals, in the caller's
    transaction (a load's, under its per-night lock on PostgreSQL)."""
    i = images
    night = and_(i.c.model_sha256 == sha, i.c.drop_date == drop_date)
    n, ok, failed = conn.execute(select(func.count(), _count_if(i.c.status == "ok"),
                                        _count_if(i.c.status == "failed")).where(night)).one()
    per_class = conn.execute(class_counts(conn, night)).all()
    key = {"model_sha256": sha, "drop_date": drop_date}
    conn.execute(delete(drop_totals).where(drop_totals.c.model_sha256 == sha,
                                           drop_totals.c.drop_date == drop_date))
    if not n:
        return
    conn.execute(drop_totals.insert().values(
        **key, images=int(n), ok=int(ok), failed=int(failed),
        detections=sum(int(count) for _, count in per_class), updated_at=now or _now()))
    if per_class:
        conn.execute(drop_class_totals.insert(),
                     [{**key, "class_name": name, "detections": int(count)}
                      for name, count in per_class])


def _staged_identity(sha: str, run: RunInfo) -> Any:
    i, s = images, _stage_images
    return and_(i.c.model_sha256 == sha, i.c.drop_date == run.drop_date, i.c.rel_path == s.c.rel_path)


def _upsert_images(conn: Connection, sha: str, run: RunInfo, now: dt.datetime) -> dict[str, int]:
    """Stage → images, set-based (ids kept, new ones numbered in rel_path order); returns
    rel_path → id of every staged image on PostgreSQL ({} on SQLite, which needs none)."""
    s, i = _stage_images, images
    folders = [literal(_setting_text(run, key), Text) for key in ("drop_dir", "output_dir")]
    source = select(
        literal(sha, String(64)), literal(run.drop_date, Date), s.c.rel_path,
        literal(run.run_key, Text), s.c.bytes, s.c.width, s.c.height, s.c.status, s.c.error,
        literal(now, DateTime(timezone=True)), *folders,
    ).where(true()).order_by(s.c.rel_path)  # WHERE: SQLite's INSERT…SELECT…ON CONFLICT needs one
    cols = ["model_sha256", "drop_date", "rel_path", "run_key", "bytes", "width", "height",
            "status", "error", "processed_at", "drop_dir", "output_dir"]
    stmt = _insert(conn, i).from_select(cols, source)
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
    det_cols = ["det_index", "class_id", "class_name", *_DET_COLS]
    new_dets = (select(i.c.id, *(d.c[c] for c in det_cols))
                .select_from(d.join(s, s.c.seq == d.c.seq).join(i, _staged_identity(sha, run)))
                .where(s.c.status == "ok"))
    conn.execute(detections.insert().from_select(["image_id", *det_cols], new_dets))


# --- queries --------------------------------------------------------------------------------

def loaded_rel_paths(engine: Engine, model_sha256: str, drop_date: dt.date) -> set[str]:
    """rel_paths this model already loaded with status 'ok' for ``drop_date``."""
    query = select(images.c.rel_path).where(
        images.c.model_sha256 == model_sha256, images.c.drop_date == drop_date,
        images.c.status == "ok")
    with engine.connect() as conn:
        return set(conn.execute(query).scalars())


def drop_summary(engine: Engine, drop_date: dt.date | None = None,
                 model_sha256: str | None = None) -> dict[str, Any]:
    """Counts for a drop (all drops / all models when None).

    ``{"images", "ok", "failed", "detections": total, "per_class": {class_name: count}}``.
    """
    where = []
    if drop_date is not None:
        where.append(images.c.drop_date == drop_date)
    if model_sha256 is not None:
        where.append(images.c.model_sha256 == model_sha256)
    counts = select(
        func.count(),
        func.coalesce(func.sum(case((images.c.status == "ok", 1), else_=0)), 0),
        func.coalesce(func.sum(case((images.c.status == "failed", 1), else_=0)), 0),
    ).select_from(images).where(*where)
    per_class = (select(detections.c.class_name, func.count())
                 .select_from(detections.join(images, images.c.id == detections.c.image_id))
                 .where(*where).group_by(detections.c.class_name)
                 .order_by(detections.c.class_name))
    with engine.connect() as conn:
        n, ok, failed = conn.execute(counts).one()
        classes = {name: int(count) for name, count in conn.execute(per_class)}
    return {"images": int(n), "ok": int(ok), "failed": int(failed),
            "detections": sum(classes.values()), "per_class": classes}


def latest_run(engine: Engine, drop_date: dt.date) -> dict[str, Any] | None:
    """The most recently loaded run of a drop: its counts and throughput."""
    query = (select(runs.c.run_key, runs.c.images, runs.c.failed, runs.c.detections,
                    runs.c.infer_seconds, runs.c.images_per_s, runs.c.loaded_at)
             .where(runs.c.drop_date == drop_date).order_by(runs.c.loaded_at.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return None if row is None else dict(row._mapping)
