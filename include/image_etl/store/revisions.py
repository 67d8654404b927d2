"""Schema revisions of the results database: Alembic (``include/image_etl/migrations``), run
programmatically on one connection, in one transaction, under a lock.

PostgreSQL: a transaction-scoped advisory lock, so concurrent migrators take turns and the
second finds nothing to do. SQLite: ``BEGIN IMMEDIATE`` (one writer at a time), with foreign
keys off for the transaction, as SQLite prescribes for the table rebuilds of batch mode
(dropping a referenced table would otherwise cascade into its children), and checked before
the commit.

A database made before Alembic (``image_etl_schema_version`` says 1) holds revision 0001's
schema: it is stamped 0001 and that table dropped, rows untouched (LEGACY_REVISIONS).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, func, inspect, select, text

from image_etl.store.engine import StoreError, begin_write

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Not Alembic's default "alembic_version": the results may share a database with an
# application that has its own (Airflow's metadata database has one).
VERSION_TABLE = "image_etl_alembic_version"
LEGACY_VERSION_TABLE = "image_etl_schema_version"  # before Alembic: one row per version
LEGACY_REVISIONS = {1: "0001"}  # a version recorded there → the revision with its schema
# pg_advisory_xact_lock key of migrations (ASCII "imgetl").
_PG_LOCK_MIGRATE = 0x696D6765746C


def context_options() -> dict[str, Any]:
    """Alembic's MigrationContext options, for env.py and for comparing a database."""
    return {"version_table": VERSION_TABLE, "render_as_batch": True, "compare_type": True,
            "compare_server_default": True}


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no revisions under {MIGRATIONS_DIR}"
    return head


def history() -> list[str]:
    """One line per revision, newest first: ``0001 (head): <its message>``."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    return [f"{rev.revision}{' (head)' if rev.revision in heads else ''}: {rev.doc}"
            for rev in script.walk_revisions()]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None when Alembic never ran on it."""
    with engine.connect() as conn:
        return _current(conn)


def migrate(engine: Engine, revision: str = "head") -> str:
    """Upgrade the schema to ``revision`` (adopting a database made before Alembic); return
    the revision it is at. Idempotent and safe when several processes call it at once."""
    with _migration_transaction(engine) as conn:
        config = alembic_config(conn)
        _adopt_legacy(conn, config)
        before = _current(conn)
        try:
            command.upgrade(config, revision)
        except CommandError as e:  # a revision this code does not know, in the database or asked for
            raise StoreError(f"cannot migrate the results database from revision {before} to "
                             f"{revision}: {e} (a newer image_etl made it? upgrade image_etl)") from None
        after = _current(conn)
    if after != before:
        log.info("migrated the results database from revision %s to %s", before, after)
    assert after is not None
    return after


def downgrade(engine: Engine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (what each revision's downgrade drops is lost),
    under the same lock and foreign-key handling as migrate(); return the revision it is at
    (None at "base": no schema)."""
    with _migration_transaction(engine) as conn:
        before = _current(conn)
        try:
            command.downgrade(alembic_config(conn), revision)
        except CommandError as e:
            raise StoreError(f"cannot downgrade the results database from revision {before} to "
                             f"{revision}: {e}") from None
        after = _current(conn)
    log.info("downgraded the results database from revision %s to %s", before, after)
    return after


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


@contextlib.contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:  # before BEGIN: inside a transaction SQLite ignores this pragma
            _sqlite_pragma(conn, "foreign_keys = OFF")
        try:
            with begin_write(conn):
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_MIGRATE)))
                yield conn
                if sqlite:
                    _check_foreign_keys(conn)
        finally:
            if sqlite and not conn.invalidated:
                _sqlite_pragma(conn, "foreign_keys = ON")


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.execute(f"PRAGMA {pragma}")  # the driver's own call: SQLAlchemy would BEGIN first


def _check_foreign_keys(conn: Connection) -> None:
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        tables = sorted({row[0] for row in broken})
        raise StoreError(f"the migration left {len(broken)} row(s) in {', '.join(tables)} whose "
                         "foreign key points nowhere; rolled back")


def _adopt_legacy(conn: Connection, config: Config) -> None:
    tables = set(inspect(conn).get_table_names())
    if LEGACY_VERSION_TABLE not in tables or VERSION_TABLE in tables:
        return
    version = conn.execute(text(f"SELECT max(version) FROM {LEGACY_VERSION_TABLE}")).scalar()
    if version is not None and version not in LEGACY_REVISIONS:
        raise StoreError(f"the results database has schema version {version} ({LEGACY_VERSION_TABLE}), "
                         "newer than this code knows: upgrade image_etl")
    if version is not None:
        command.stamp(config, LEGACY_REVISIONS[version])
        log.info("adopted the results database (schema version %d, made before Alembic) as "
                 "revision %s", version, LEGACY_REVISIONS[version])
    conn.exec_driver_sql(f"DROP TABLE {LEGACY_VERSION_TABLE}")
