"""The results database's engine: URL handling, connection set-up (with connect and statement
timeouts), write transactions, and errors that name the database in one line with the password
hidden."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

SQLITE_BUSY_TIMEOUT_MS = 60_000

# Every engine is bounded: a database that accepts TCP and never answers, a statement stuck
# behind a lock. The environment sets the bounds (seconds); the Detections page has its own,
# shorter statement timeout (plugins/image_etl_detections/results_db.py).
CONNECT_TIMEOUT_ENV = "IMAGE_ETL_DB_CONNECT_TIMEOUT_S"
STATEMENT_TIMEOUT_ENV = "IMAGE_ETL_DB_STATEMENT_TIMEOUT_S"
BUSY_TIMEOUT_ENV = "IMAGE_ETL_DB_BUSY_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 5
DEFAULT_STATEMENT_TIMEOUT_S = 600.0  # a load's COPY of a big night, a migration
MAX_TIMEOUT_S = 86_400

# Extras of an Airflow postgres Connection that are about Airflow's hook, not libpq (the
# provider's PostgresHook.ignored_extra_options); every other extra is a libpq keyword.
HOOK_ONLY_EXTRAS = frozenset({"cursor", "sqlalchemy_scheme", "enable_log_db_messages",
                              "aws_conn_id", "azure_conn_id", "cluster-identifier",
                              "workgroup-name"})
# Extras that ask for a sign-in this code does not do: refused, never silently ignored.
UNSUPPORTED_EXTRAS = ("iam", "redshift", "redshift-serverless")


class StoreError(ValueError):
    """The database or its URL cannot be used; the message says which (password hidden)."""


StoreError.__module__ = "image_etl.store"  # its public name, as tracebacks print it


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long an engine's connections may wait (seconds).

    ``connect_s``: libpq's ``connect_timeout`` (TCP connect, TLS and sign-in together; libpq
    counts whole seconds, at least 2). ``statement_s``: PostgreSQL's ``statement_timeout``
    (0: none); ``busy_s``: how long a SQLite statement waits for another writer's lock.
    A ``connect_timeout`` or ``statement_timeout`` already in the URL (or the connection's
    extras) wins over these.
    """

    connect_s: int = DEFAULT_CONNECT_TIMEOUT_S
    statement_s: float = DEFAULT_STATEMENT_TIMEOUT_S
    busy_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000

    @classmethod
    def from_env(cls, *, statement_env: str = STATEMENT_TIMEOUT_ENV,
                 statement_default: float = DEFAULT_STATEMENT_TIMEOUT_S) -> Timeouts:
        return cls(connect_s=math.ceil(seconds_from_env(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S,
                                                         minimum=1)),
                   statement_s=seconds_from_env(statement_env, statement_default, minimum=0),
                   busy_s=seconds_from_env(BUSY_TIMEOUT_ENV, SQLITE_BUSY_TIMEOUT_MS / 1000,
                                            minimum=0.001))


def seconds_from_env(name: str, default: float, *, minimum: float) -> float:
    """``$name`` as seconds in minimum..MAX_TIMEOUT_S, else ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"invalid parameter {name}: {raw!r} is not a number of seconds") from None
    if not minimum <= value <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise StoreError(f"invalid parameter {name}: {raw!r} is outside {minimum:g}..{MAX_TIMEOUT_S}"
                         " seconds")
    return value


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for logs and error messages."""
    try:
        text = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        text = str(url)
        # Not parseable by SQLAlchemy: hide whatever sits between "user:" and "@".
        text = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)
    # libpq also takes the password (and a client key's passphrase) as query parameters.
    return re.sub(r"(?i)([?&](?:ssl)?password=)[^&]*", r"\1***", text)


def default_url() -> str:
    """The embedded default: a SQLite file beside Airflow's home (or ~/.image_etl)."""
    home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / ".image_etl")
    return f"sqlite:///{Path(home) / 'image_etl_results.db'}"


def results_url(conn: Any | None = None) -> str:
    """The results DB's URL: from the Airflow Connection ``image_etl_db`` when one is given
    (the DAG reads it through the Task SDK, the UI plugin through the API server's models),
    else ``IMAGE_ETL_DB_URL``, else the embedded SQLite default."""
    if conn is None:
        return os.environ.get("IMAGE_ETL_DB_URL") or default_url()
    return url_from_connection(conn.conn_type, host=conn.host, port=conn.port, login=conn.login,
                               password=conn.password, schema=conn.schema,
                               extra=getattr(conn, "extra_dejson", None))


def url_from_connection(conn_type: str | None, *, host: str | None = None,
                        port: int | None = None, login: str | None = None,
                        password: str | None = None, schema: str | None = None,
                        extra: dict[str, Any] | None = None) -> str:
    """A SQLAlchemy URL from an Airflow Connection's fields (``image_etl_db``).

    Airflow calls PostgreSQL ``postgres``; SQLite connections keep the file path in ``host``.
    A postgres connection's extras become libpq keywords, as Airflow's PostgresHook passes
    them (``sslmode``, ``sslrootcert``, ``connect_timeout``, ``options``, ...; its
    ``sqlalchemy_query`` dict too): a TLS setting is never dropped.
    """
    kind = (conn_type or "").lower()
    if kind in {"postgres", "postgresql"}:
        url = URL.create("postgresql+psycopg2", username=login or None, password=password or None,
                         host=host or None, port=port or None, database=schema or None,
                         query=libpq_keywords(extra or {}))
        return url.render_as_string(hide_password=False)
    if kind == "sqlite":
        path = host or schema
        if not path:
            raise StoreError("image_etl_db: a sqlite connection needs the database file in host")
        return f"sqlite:///{path}"
    raise StoreError(f"image_etl_db: unsupported connection type {conn_type!r}; "
                     "use postgres or sqlite")


def libpq_keywords(extra: dict[str, Any]) -> dict[str, str]:
    """A postgres Connection's extras as libpq keywords (URL query parameters)."""
    for name in UNSUPPORTED_EXTRAS:
        if _truthy(extra.get(name)):
            raise StoreError(f"image_etl_db: extra {name!r} asks for a sign-in image_etl does not "
                             "do; give the connection a login and password (or a client "
                             "certificate: sslcert, sslkey)")
    query = extra.get("sqlalchemy_query") or {}
    if not isinstance(query, dict):
        raise StoreError("image_etl_db: extra 'sqlalchemy_query' must be a JSON object")
    keywords: dict[str, str] = {}
    for name, value in {**query, **extra}.items():
        if name in HOOK_ONLY_EXTRAS or name in UNSUPPORTED_EXTRAS or name == "sqlalchemy_query":
            continue
        if value is None:
            continue
        if isinstance(value, bool):
            keywords[name] = "1" if value else "0"
        elif isinstance(value, (str, int, float)):
            keywords[name] = str(value)
        else:  # a nested object: no libpq keyword takes one (its value stays out of the message)
            raise StoreError(f"image_etl_db: extra {name!r} must be a string or a number")
    return keywords


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in {"1", "true", "yes", "on"}


def engine_from_url(url: str, timeouts: Timeouts | None = None) -> Engine:
    """An Engine for ``sqlite:///path`` or ``postgresql+psycopg2://...``.

    SQLite: the file's folder is created; every connection gets foreign keys on, WAL and a
    busy timeout, and SQLAlchemy (not the sqlite3 module) emits BEGIN, so DDL is
    transactional too; :func:`write_transaction` begins with ``BEGIN IMMEDIATE``.
    PostgreSQL: a connect timeout and a statement timeout (``timeouts``, default from the
    environment: :meth:`Timeouts.from_env`), unless the URL sets its own.
    """
    timeouts = timeouts or Timeouts.from_env()
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
        kwargs["connect_args"] = {"timeout": timeouts.busy_s}
    elif backend == "postgresql":
        if parsed.get_driver_name() == "psycopg2":
            kwargs["client_encoding"] = "utf8"
        parsed = _with_pg_timeouts(parsed, timeouts)
    else:
        raise StoreError(f"db_url: unsupported database {backend!r} in {redact_url(url)!r}; "
                         "use sqlite:///path or postgresql+psycopg2://...")
    try:
        engine = create_engine(parsed, pool_pre_ping=backend == "postgresql", **kwargs)
    except Exception as e:  # a missing driver etc.: name the URL, never the password
        raise StoreError(f"db_url: cannot create an engine for {redact_url(url)!r}: {e}") from None
    if backend == "sqlite":
        _sqlite_events(engine, round(timeouts.busy_s * 1000))
    _connect_errors(engine, url, parsed.password)
    return engine


def _with_pg_timeouts(url: URL, timeouts: Timeouts) -> URL:
    """``connect_timeout`` and ``options=-c statement_timeout=...`` added to the libpq keywords,
    each unless the URL already has one. (A PgBouncer in transaction mode refuses ``options``
    unless it is in its ``ignore_startup_parameters``; or set the statement timeout to 0.)"""
    query: dict[str, Any] = dict(url.query)
    if "connect_timeout" not in query:
        query["connect_timeout"] = str(timeouts.connect_s)
    options = query.get("options") or ""
    if isinstance(options, str) and timeouts.statement_s > 0 and "statement_timeout" not in options:
        ms = max(1, round(timeouts.statement_s * 1000))
        query["options"] = f"{options} -c statement_timeout={ms}".strip()
    return url.set(query=query)


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


def _sqlite_events(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN (the sqlite3 module would only begin
        # before DML, leaving DDL and reads outside the transaction).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute(f"PRAGMA busy_timeout = {busy_timeout_ms:d}")
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
    with engine.connect() as conn, begin_write(conn):
        yield conn


@contextlib.contextmanager
def begin_write(conn: Connection) -> Iterator[Connection]:
    """:func:`write_transaction` on a connection the caller holds (and has not begun)."""
    try:
        with conn.execution_options(image_etl_write=True).begin():
            yield conn
    except Exception as exc:
        if not conn.invalidated:  # SQLAlchemy invalidates a connection only on a disconnect
            raise
        root = _first_error(exc)
        url = conn.engine.url
        reason = _one_line(getattr(root, "libpq_message", None) or root, url.password)
        raise StoreError(f"lost the connection to the results database "
                         f"{redact_url(url.render_as_string(hide_password=False))} inside a "
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
def in_transaction(conn_or_engine: Connection | Engine) -> Iterator[Connection]:
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


def dialect_insert(conn: Connection, table: Table) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_update``/``do_nothing``."""
    if conn.dialect.name == "postgresql":
        return pg_dialect.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite_dialect.insert(table)
    raise StoreError(f"unsupported database {conn.dialect.name!r}")
