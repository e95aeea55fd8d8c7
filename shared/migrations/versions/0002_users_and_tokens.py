"""Users and API tokens; jobs get an owner.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create user_account and api_token, and add the nullable job.owner_id."""
    op.create_table(
        "user_account",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_user_account"),
        sa.UniqueConstraint("name", name="uq_user_account_name"),
    )
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("public_id", sa.String(16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_token"),
        sa.UniqueConstraint("public_id", name="uq_api_token_public_id"),
        sa.UniqueConstraint("token_hash", name="uq_api_token_token_hash"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user_account.id"],
            name="fk_api_token_user_id_user_account",
            ondelete="CASCADE",
        ),
    )
    _add_owner_column()
    op.create_index("ix_job_owner_id", "job", ["owner_id"])


def _add_owner_column() -> None:
    # A plain ADD COLUMN, not a batch rebuild: rebuilding job on SQLite (foreign keys on)
    # would drop the old table and cascade-delete every metric and artifact row. SQLite
    # cannot ALTER in a constraint, but accepts one inline in ADD COLUMN.
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE job ADD COLUMN owner_id INTEGER "
            "CONSTRAINT fk_job_owner_id_user_account REFERENCES user_account (id)"
        )
        return
    op.add_column(
        "job",
        sa.Column(
            "owner_id",
            sa.Integer(),
            sa.ForeignKey("user_account.id", name="fk_job_owner_id_user_account"),
            nullable=True,
        ),
    )


def downgrade() -> None:
    """Drop what the upgrade added."""
    op.drop_index("ix_job_owner_id", table_name="job")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("owner_id")
    op.drop_table("api_token")
    op.drop_table("user_account")
