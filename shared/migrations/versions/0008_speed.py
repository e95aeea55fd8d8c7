"""Speed: a user's job list pages on an index of their own jobs, newest first.

Revision ID: 0008
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Index job (owner_id, created_at, id): GET /jobs for one user reads one page, not all."""
    # Without it the owner filter finds the user's rows by ix_job_owner_id and sorts them all
    # for every page, so a user's list slows down with each job they ever submitted.
    op.create_index("ix_job_owner_created", "job", ["owner_id", "created_at", "id"])


def downgrade() -> None:
    """Drop what upgrade added."""
    op.drop_index("ix_job_owner_created", table_name="job")
