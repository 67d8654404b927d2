"""The results schema: models, runs, images, detections.

The schema image_etl created before it used Alembic ("schema version 1"); such a database is
stamped with this revision instead of running it (store/revisions.py).

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id_type() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("class_names", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )
    op.create_table(
        "runs",
        sa.Column("run_key", sa.Text(), nullable=False),
        sa.Column("dag_id", sa.Text(), nullable=True),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column("drop_date", sa.Date(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("ok", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("detections", sa.BigInteger(), nullable=False),
        sa.Column("infer_seconds", sa.Double(), nullable=False),
        sa.Column("images_per_s", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(["model_sha256"], ["models.sha256"]),
        sa.PrimaryKeyConstraint("run_key"),
    )
    op.create_table(
        "images",
        sa.Column("id", _id_type(), autoincrement=True, nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("drop_date", sa.Date(), nullable=False),
        sa.Column("rel_path", sa.Text(), nullable=False),
        sa.Column("run_key", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('ok', 'failed')", name="ck_images_status"),
        sa.ForeignKeyConstraint(["model_sha256"], ["models.sha256"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_sha256", "drop_date", "rel_path", name="uq_images_identity"),
    )
    op.create_table(
        "detections",
        sa.Column("image_id", _id_type(), nullable=False),
        sa.Column("det_index", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("class_name", sa.Text(), nullable=False),
        *(sa.Column(c, sa.Double(), nullable=False)
          for c in ("confidence", "x1", "y1", "x2", "y2", "xc", "yc", "w", "h")),
        sa.CheckConstraint("confidence >= 0 AND confidence <= 1", name="ck_detections_confidence"),
        sa.CheckConstraint("det_index >= 0", name="ck_detections_det_index"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("image_id", "det_index", name="pk_detections"),
    )


def downgrade() -> None:
    for table in ("detections", "images", "runs", "models"):
        op.drop_table(table)
