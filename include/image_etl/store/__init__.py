"""The results database: schema, migrations and the idempotent load of staged rows.

SQLAlchemy 2 Core, no ORM. A SQLite file by default (no server needed), PostgreSQL in
production. Identity: a result is (model_sha256, drop_date, rel_path); loading it again
replaces that image's row (same id) and its detections, all in one transaction. File names
never become SQL text: they travel as bound parameters or as COPY data.

    engine.py          URL, engine, write transactions, errors with the password hidden
    schema.py          the tables, declared once
    revisions.py       Alembic migrations (include/image_etl/migrations), run under a lock
    load.py            the idempotent replace of a load's rows (read by image_etl.staging),
                       the night's totals recounted
    postgres_copy.py   COPY on PostgreSQL
    queries.py         what the stages (and the Detections page) read back
"""

from image_etl.store.engine import (
    SQLITE_BUSY_TIMEOUT_MS,
    StoreError,
    Timeouts,
    default_url,
    engine_from_url,
    redact_url,
    results_url,
    url_from_connection,
    write_transaction,
)
from image_etl.store.load import (
    LoadReport,
    RunInfo,
    load_staged,
    model_names,
    record_empty_run,
    record_night_files,
    refresh_drop_totals,
    upsert_model,
)
from image_etl.store.queries import (
    class_counts,
    count_if,
    drop_summary,
    image_rows,
    latest_run,
    loaded_rel_paths,
    night_accounting,
    nights_that_ran,
)
from image_etl.store.revisions import (
    current_revision,
    downgrade,
    head_revision,
    history,
    migrate,
)
from image_etl.store.schema import (
    detections,
    drop_class_totals,
    drop_totals,
    images,
    metadata,
    models,
    night_files,
    result_settings,
    run_key,
    runs,
)

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS", "LoadReport", "RunInfo", "StoreError", "Timeouts", "class_counts",
    "count_if",
    "current_revision", "default_url", "detections", "downgrade", "drop_class_totals",
    "drop_summary", "drop_totals", "engine_from_url", "head_revision", "history", "images",
    "latest_run", "load_staged", "loaded_rel_paths", "metadata", "migrate", "model_names",
    "models", "record_empty_run", "redact_url", "refresh_drop_totals", "results_url", "run_key", "runs",
    "upsert_model", "url_from_connection", "write_transaction", "image_rows",
    "night_accounting", "nights_that_ran", "night_files", "record_night_files", "result_settings",
]
