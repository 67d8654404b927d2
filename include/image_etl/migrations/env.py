"""Alembic's environment for the results database.

Run by ``image_etl.store.migrate()`` (``python -m image_etl db upgrade``), which hands over
its connection, inside the transaction that holds the migration lock, as
``config.attributes["connection"]``: every revision of an upgrade commits or rolls back
together. Revisions live in ``versions/``; autogenerate renders SQLite changes in batch mode
(a table rebuild, which SQLite needs for most column changes).
"""

from alembic import context

from image_etl.store.revisions import context_options
from image_etl.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("the results database is migrated by image_etl.store.migrate() "
                       "(python -m image_etl db upgrade), which passes its connection")
context.configure(connection=connection, target_metadata=metadata, **context_options())
with context.begin_transaction():
    context.run_migrations()
