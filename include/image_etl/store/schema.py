"""The results schema, declared once: what queries and loads use, and what Alembic compares
the migrated database with (``include/image_etl/migrations``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Double,
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
    false,
)

from image_etl.staging import DET_FIELDS

# A detection's numbers, in the order a staged row holds them after its class (DET_FIELDS).
DET_COLS = ("confidence", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h")
assert DET_FIELDS[:2] == ("cls", "conf") and DET_FIELDS[2:] == DET_COLS[1:]


def run_key(dag_id: str, run_id: str) -> str:
    """A DAG run's identity in ``runs`` and ``images``: ``<dag_id>/<run_id>``."""
    return f"{dag_id}/{run_id}"


def run_id_of(key: str) -> str:
    """The run_id part of a :func:`run_key` (a DAG id has no "/")."""
    return key.split("/", 1)[1] if "/" in key else key


def _id_type() -> Any:
    # SQLite numbers rows itself only for an INTEGER PRIMARY KEY (its rowid).
    return BigInteger().with_variant(Integer, "sqlite")


metadata = MetaData()

models = Table(
    "models", metadata,
    Column("sha256", String(64), primary_key=True),
    Column("name", Text),
    Column("path", Text),
    Column("class_names", Text, nullable=False),  # JSON object {"0": "person", ...}
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("run_key", Text, primary_key=True),  # run_key(dag_id, run_id)
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

# One row per set of result settings (image_etl.identity): what a result_key stands for.
result_settings = Table(
    "result_settings", metadata,
    Column("result_key", String(16), primary_key=True),
    Column("settings", Text, nullable=False),  # JSON
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

images = Table(
    "images", metadata,
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
    # The folders of the load that wrote the row: a run key re-run for another date (a
    # backfill clearing an earlier run) replaces its ``runs`` row and settings. NULL for rows
    # loaded before revision 0002 whose run no longer records their night.
    Column("drop_dir", Text, nullable=True),
    Column("output_dir", Text, nullable=True),
    # The result settings that produced the row (result_settings.result_key; NULL: loaded
    # before revision 0003, not recorded), and whether a later night's run loaded it (a late
    # file caught up into its own night).
    Column("result_key", String(16),
           ForeignKey("result_settings.result_key", name="images_result_key_fkey"), nullable=True),
    Column("caught_up", Boolean, nullable=False, server_default=false()),
    # Its unique index also serves every lookup by (model_sha256, drop_date): a second
    # index on that prefix would only slow the loads down.
    UniqueConstraint("model_sha256", "drop_date", "rel_path", name="uq_images_identity"),
    CheckConstraint("status IN ('ok', 'failed')", name="ck_images_status"),
    Index("ix_images_run_key", "run_key"),  # a DAG run's images (the run tab)
)

detections = Table(
    "detections", metadata,
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

# One row per (model, night), recounted by every load in its transaction: the nights chart
# reads 30 rows instead of aggregating 30 nights of detections.
drop_totals = Table(
    "drop_totals", metadata,
    Column("model_sha256", String(64), ForeignKey("models.sha256"), nullable=False),
    Column("drop_date", Date, nullable=False),
    Column("images", Integer, nullable=False),
    Column("ok", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("detections", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("model_sha256", "drop_date", name="pk_drop_totals"),
)

drop_class_totals = Table(
    "drop_class_totals", metadata,
    Column("model_sha256", String(64), nullable=False),
    Column("drop_date", Date, nullable=False),
    Column("class_name", Text, nullable=False),
    Column("detections", BigInteger, nullable=False),
    PrimaryKeyConstraint("model_sha256", "drop_date", "class_name", name="pk_drop_class_totals"),
    ForeignKeyConstraint(["model_sha256", "drop_date"],
                         ["drop_totals.model_sha256", "drop_totals.drop_date"],
                         ondelete="CASCADE", name="fk_drop_class_totals_night"),
)

# A night's files as the last run that listed them saw them (its own run, or a later night's
# look-back): what the report and the Detections page account for beside the loaded rows.
night_files = Table(
    "night_files", metadata,
    Column("model_sha256", String(64), nullable=False),
    Column("drop_date", Date, nullable=False),
    Column("run_key", Text, nullable=False),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    Column("listed", Integer, nullable=False),  # image files ready to read
    Column("unsettled", Integer, nullable=False),  # image files still being written
    Column("unsettled_names", Text, nullable=False),  # JSON list: the first few
    Column("skipped_links", Integer, nullable=False),
    Column("skipped_unknown", Integer, nullable=False),  # not a known image extension
    Column("skipped_hidden", Integer, nullable=False),
    PrimaryKeyConstraint("model_sha256", "drop_date", name="pk_night_files"),
)
