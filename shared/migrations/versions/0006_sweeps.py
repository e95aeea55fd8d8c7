"""Sweeps: the sweep table, and job.sweep_id, job.trial_number, job.prune_requested.

Revision ID: 0006
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create sweep and give jobs their sweep, trial number and prune flag."""
    op.create_table(
        "sweep",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("max_trials", sa.Integer(), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=False),
        sa.Column("max_failed", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("controller", sa.String(255), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sweep"),
        sa.UniqueConstraint("idempotency_key", name="uq_sweep_idempotency_key"),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["user_account.id"], name="fk_sweep_owner_id_user_account"
        ),
    )
    op.create_index("ix_sweep_status", "sweep", ["status"])
    op.create_index("ix_sweep_owner_id", "sweep", ["owner_id"])
    op.create_index("ix_sweep_created_id", "sweep", ["created_at", "id"])
    _add_job_columns()
    op.create_index("ix_job_sweep_id", "job", ["sweep_id"])
    op.create_index("ux_job_sweep_trial", "job", ["sweep_id", "trial_number"], unique=True)


def _add_job_columns() -> None:
    # Plain ADD COLUMNs, not a batch rebuild: rebuilding job on SQLite (foreign keys on)
    # would cascade-delete every metric and artifact row (see 0002).
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE job ADD COLUMN sweep_id VARCHAR(32) "
            "CONSTRAINT fk_job_sweep_id_sweep REFERENCES sweep (id)"
        )
    else:
        op.add_column(
            "job",
            sa.Column(
                "sweep_id",
                sa.String(32),
                sa.ForeignKey("sweep.id", name="fk_job_sweep_id_sweep"),
                nullable=True,
            ),
        )
    op.add_column("job", sa.Column("trial_number", sa.Integer(), nullable=True))
    op.add_column(
        "job",
        sa.Column("prune_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    """Drop what the upgrade added."""
    op.drop_index("ux_job_sweep_trial", table_name="job")
    op.drop_index("ix_job_sweep_id", table_name="job")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("prune_requested")
        batch.drop_column("trial_number")
        batch.drop_column("sweep_id")
    op.drop_index("ix_sweep_created_id", table_name="sweep")
    op.drop_index("ix_sweep_owner_id", table_name="sweep")
    op.drop_index("ix_sweep_status", table_name="sweep")
    op.drop_table("sweep")
