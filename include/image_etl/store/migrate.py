"""Schema migrations of the results database."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Column, Connection, Engine, Integer, MetaData, Table, func, inspect, select

from image_etl.store.engine import StoreError, write_transaction
from image_etl.store.schema import metadata

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key of migrations (ASCII "imgetl").
_PG_LOCK_MIGRATE = 0x696D6765746C

schema_version = Table("image_etl_schema_version", MetaData(),
                       Column("version", Integer, primary_key=True, autoincrement=False))


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn)


# Ordered: MIGRATIONS[n] takes the schema from version n to n + 1. Append, never edit.
MIGRATIONS: Sequence[Callable[[Connection], None]] = (_migration_1,)


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
