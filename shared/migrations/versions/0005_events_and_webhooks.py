"""Job events (the log and the live stream) and the webhook outbox.

Revision ID: 0005
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create job_event, webhook_endpoint, webhook_delivery and webhook_attempt."""
    op.create_table(
        "job_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_job_event"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["job.id"], name="fk_job_event_job_id_job", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_job_event_job_kind_id", "job_event", ["job_id", "kind", "id"])
    op.create_index("ix_job_event_reason", "job_event", ["reason"])
    _create_webhook_tables()


def _create_webhook_tables() -> None:
    op.create_table(
        "webhook_endpoint",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("description", sa.String(200), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("disabled_at", TS, nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_endpoint"),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["user_account.id"],
            name="fk_webhook_endpoint_owner_id_user_account", ondelete="CASCADE",
        ),
    )  # fmt: skip
    op.create_index("ix_webhook_endpoint_owner_id", "webhook_endpoint", ["owner_id"])
    op.create_table(
        "webhook_delivery",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("endpoint_id", sa.String(32), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_delivery"),
        sa.ForeignKeyConstraint(
            ["endpoint_id"], ["webhook_endpoint.id"],
            name="fk_webhook_delivery_endpoint_id_webhook_endpoint", ondelete="CASCADE",
        ),
    )  # fmt: skip
    op.create_index("ix_webhook_delivery_due", "webhook_delivery", ["status", "next_attempt_at"])
    op.create_index("ix_webhook_delivery_endpoint_id", "webhook_delivery", ["endpoint_id"])
    op.create_table(
        "webhook_attempt",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_attempt"),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["webhook_delivery.id"],
            name="fk_webhook_attempt_delivery_id_webhook_delivery", ondelete="CASCADE",
        ),
    )  # fmt: skip
    op.create_index("ix_webhook_attempt_delivery_id", "webhook_attempt", ["delivery_id"])
    op.create_index("ix_webhook_attempt_outcome", "webhook_attempt", ["outcome"])


def downgrade() -> None:
    """Drop the tables this revision created."""
    for table in ("webhook_attempt", "webhook_delivery", "webhook_endpoint", "job_event"):
        op.drop_table(table)
