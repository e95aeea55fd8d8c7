"""Dashboard sessions: a row per signed-in browser, so sign-out and revocation end it.

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
# The newest revision on this branch; re-chained after the newest of main when merging.
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create dashboard_session."""
    op.create_table(
        "dashboard_session",
        sa.Column("id_hash", sa.String(64), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id_hash", name="pk_dashboard_session"),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_token.id"],
            name="fk_dashboard_session_token_id_api_token",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_dashboard_session_token_id", "dashboard_session", ["token_id"])
    op.create_index("ix_dashboard_session_last_seen_at", "dashboard_session", ["last_seen_at"])


def downgrade() -> None:
    """Drop dashboard_session."""
    op.drop_index("ix_dashboard_session_last_seen_at", table_name="dashboard_session")
    op.drop_index("ix_dashboard_session_token_id", table_name="dashboard_session")
    op.drop_table("dashboard_session")
