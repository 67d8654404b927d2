"""Each image's folders, an index of a run's images, the night totals.

images.drop_dir / images.output_dir: the folders of the load that wrote the row (a run key
re-run for another date replaces its runs row, so runs.settings no longer tells where older
rows came from). Existing rows take them from their run's settings, only where that run row
still describes their night (same date and model); others stay NULL (unknown).
ix_images_run_key: a DAG run's images. drop_totals / drop_class_totals: one row per model and
night (and class), recounted by every load; existing nights are counted here.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# PostgreSQL: runs.settings as jsonb, NULL where it is not JSON a jsonb can hold (NaN, \u0000),
# so one odd row cannot fail the upgrade. A temporary function, dropped before the commit.
_PG_JSONB = """
CREATE FUNCTION pg_temp.image_etl_0002_jsonb(value text) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    RETURN value::jsonb;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END $$
"""

_FOLDERS = """
UPDATE images SET drop_dir = f.drop_dir, output_dir = f.output_dir
FROM (SELECT run_key, drop_date, model_sha256, {drop_dir} AS drop_dir,
             {output_dir} AS output_dir FROM runs) AS f
WHERE f.drop_dir IS NOT NULL AND images.run_key = f.run_key
  AND images.drop_date = f.drop_date AND images.model_sha256 = f.model_sha256
"""

_NIGHT_TOTALS = """
INSERT INTO drop_totals (model_sha256, drop_date, images, ok, failed, detections, updated_at)
SELECT i.model_sha256, i.drop_date, count(*),
       coalesce(sum(CASE WHEN i.status = 'ok' THEN 1 ELSE 0 END), 0),
       coalesce(sum(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END), 0),
       coalesce(sum(n.detections), 0), :now
FROM images AS i
LEFT JOIN (SELECT image_id, count(*) AS detections FROM detections GROUP BY image_id) AS n
       ON n.image_id = i.id
GROUP BY i.model_sha256, i.drop_date
"""

_CLASS_TOTALS = """
INSERT INTO drop_class_totals (model_sha256, drop_date, class_name, detections)
SELECT i.model_sha256, i.drop_date, d.class_name, count(*)
FROM detections AS d JOIN images AS i ON i.id = d.image_id
GROUP BY i.model_sha256, i.drop_date, d.class_name
"""


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("drop_dir", sa.Text(), nullable=True))
        batch.add_column(sa.Column("output_dir", sa.Text(), nullable=True))
    _backfill_folders(op.get_bind())
    op.create_index("ix_images_run_key", "images", ["run_key"])  # after the backfill's writes
    op.create_table(
        "drop_totals",
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("drop_date", sa.Date(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("detections", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_sha256"], ["models.sha256"]),
        sa.PrimaryKeyConstraint("model_sha256", "drop_date", name="pk_drop_totals"),
    )
    op.create_table(
        "drop_class_totals",
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("drop_date", sa.Date(), nullable=False),
        sa.Column("class_name", sa.Text(), nullable=False),
        sa.Column("detections", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["model_sha256", "drop_date"],
                                ["drop_totals.model_sha256", "drop_totals.drop_date"],
                                name="fk_drop_class_totals_night", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_sha256", "drop_date", "class_name",
                                name="pk_drop_class_totals"),
    )
    _backfill_totals(op.get_bind())


def downgrade() -> None:
    op.drop_table("drop_class_totals")
    op.drop_table("drop_totals")
    op.drop_index("ix_images_run_key", table_name="images")
    # SQLite rebuilds ``images`` here: migrate()'s transaction has its foreign keys off, so
    # the rebuild does not cascade into ``detections``.
    with op.batch_alter_table("images") as batch:
        batch.drop_column("output_dir")
        batch.drop_column("drop_dir")


def _setting(dialect: str, key: str) -> str:
    """SQL for ``runs.settings[key]`` where it is a non-empty JSON string, else NULL (also
    where the settings are not JSON). ``key`` is one of ours, never input."""
    if dialect == "sqlite":  # CASE, not AND: SQLite may evaluate both sides of an AND
        return (f"CASE WHEN json_valid(settings) THEN CASE WHEN json_type(settings, '$.{key}') "
                f"= 'text' THEN nullif(json_extract(settings, '$.{key}'), '') END END")
    settings = "pg_temp.image_etl_0002_jsonb(settings)"
    return (f"CASE WHEN jsonb_typeof({settings} -> '{key}') = 'string' "
            f"THEN nullif({settings} ->> '{key}', '') END")


def _backfill_folders(bind: sa.Connection) -> None:
    dialect = bind.dialect.name
    if dialect == "postgresql":
        bind.exec_driver_sql(_PG_JSONB)
    bind.execute(sa.text(_FOLDERS.format(drop_dir=_setting(dialect, "drop_dir"),
                                         output_dir=_setting(dialect, "output_dir"))))
    if dialect == "postgresql":
        bind.exec_driver_sql("DROP FUNCTION pg_temp.image_etl_0002_jsonb(text)")


def _backfill_totals(bind: sa.Connection) -> None:
    now = sa.bindparam("now", dt.datetime.now(dt.UTC), type_=sa.DateTime(timezone=True))
    bind.execute(sa.text(_NIGHT_TOTALS).bindparams(now))
    bind.execute(sa.text(_CLASS_TOTALS))
