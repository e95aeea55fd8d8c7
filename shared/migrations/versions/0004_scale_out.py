"""Scale-out: the claim order index, who runs a job, and workers that drain.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add job.worker_id and job.worker_pid, worker.state, and the claim-order index."""
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("worker_pid", sa.Integer(), nullable=True))
    with op.batch_alter_table("worker") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="live"))
    # A worker takes the best queued job of a queue: highest priority, then oldest.
    op.create_index(
        "ix_job_claim_order",
        "job",
        ["status", "queue", "priority", "created_at", "id"],
    )


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_index("ix_job_claim_order", table_name="job")
    with op.batch_alter_table("worker") as batch:
        batch.drop_column("state")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("worker_pid")
        batch.drop_column("worker_id")
