"""Result identity and the night's file accounting.

result_settings: what each result_key (image_etl.identity) stands for. images.result_key:
the settings that produced the row; NULL for rows loaded before this revision (their
settings were not recorded: they count as loaded, see README "What happens to every file").
images.caught_up: the row was loaded by a later night's look-back (a late file).
night_files: a night's files as the last run that listed them saw them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "result_settings",
        sa.Column("result_key", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("result_key"),
    )
    # SQLite rebuilds ``images`` here (a foreign key): migrate()'s transaction has its
    # foreign keys off, so the rebuild does not cascade into ``detections``.
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("result_key", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("caught_up", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.create_foreign_key("images_result_key_fkey", "result_settings", ["result_key"],
                                 ["result_key"])
    op.create_table(
        "night_files",
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("drop_date", sa.Date(), nullable=False),
        sa.Column("run_key", sa.Text(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listed", sa.Integer(), nullable=False),
        sa.Column("unsettled", sa.Integer(), nullable=False),
        sa.Column("unsettled_names", sa.Text(), nullable=False),
        sa.Column("skipped_links", sa.Integer(), nullable=False),
        sa.Column("skipped_unknown", sa.Integer(), nullable=False),
        sa.Column("skipped_hidden", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("model_sha256", "drop_date", name="pk_night_files"),
    )


def downgrade() -> None:
    op.drop_table("night_files")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("images_result_key_fkey", type_="foreignkey")
        batch.drop_column("caught_up")
        batch.drop_column("result_key")
    op.drop_table("result_settings")
