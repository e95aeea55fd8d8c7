"""ORM models: the job row is the truth about a job; metrics and artifacts hang off it.

A sweep is a row too: its trials are ordinary jobs carrying ``sweep_id`` and ``trial_number``.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Timezone-aware now, the only clock rows are stamped with."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A job id: 32 hex characters, unguessable, safe in URLs and file names."""
    return uuid.uuid4().hex


class JobStatus(enum.StrEnum):
    """Where a job is in its life: queued → running → succeeded | failed | cancelled | pruned."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # A sweep trial its controller stopped early (ASHA, median): it keeps its checkpoints.
    PRUNED = "pruned"

    @property
    def finished(self) -> bool:
        """True for the end states, which never change again."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


class SweepStatus(enum.StrEnum):
    """Where a sweep is: running → completed | failed | cancelled."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerState(enum.StrEnum):
    """What a worker's row says of it; "lost" is derived from a missed heartbeat, not stored."""

    LIVE = "live"
    DRAINING = "draining"
    LOST = "lost"


# Named constraints let Alembic alter them later, SQLite batch mode included.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every mnistq table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Job(Base):
    """One training run requested over HTTP."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_status_created", "status", "created_at"),
        # The job list pages newest first on (created_at, id).
        Index("ix_job_created_id", "created_at", "id"),
        # One job per trial number of a sweep, whatever controllers race (NULLs are distinct).
        Index("ux_job_sweep_trial", "sweep_id", "trial_number", unique=True),
        # ... and a user's own list on (owner_id, created_at, id) (migration 0008).
        Index("ix_job_owner_created", "owner_id", "created_at", "id"),
        # A worker claims the best queued job of a queue: highest priority, then oldest.
        Index("ix_job_claim_order", "status", "queue", "priority", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED, index=True)
    hyperparameters: Mapped[dict[str, Any]]
    device_requested: Mapped[str] = mapped_column(String(8), default="auto")
    device_used: Mapped[str | None] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Per user: shared.jobs stores sha256(owner, key), so the unique column scopes keys by owner.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    # sha256 of the validated request, so a replayed key with another body is refused.
    request_hash: Mapped[str | None] = mapped_column(String(64))

    # Who submitted it; NULL for jobs from before authentication (only admins see those).
    owner_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("user_account.id"), index=True)

    # Lease: who runs the job now and until when (renewed by the heartbeat).
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Set by a sweep's controller: the running trial stops at its next heartbeat, ``pruned``.
    prune_requested: Mapped[bool] = mapped_column(default=False)

    # A trial of a sweep: which one, and its number within it (0, 1, ...).
    sweep_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("sweep.id"), index=True)
    trial_number: Mapped[int | None]

    # Continued training from another job's checkpoint.
    resume_from_job_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("job.id"))
    resume_from_epoch: Mapped[int | None]

    # Progress, written at every log interval.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    n_epochs: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps_per_epoch: Mapped[int] = mapped_column(Integer, default=0)
    samples_seen: Mapped[int] = mapped_column(Integer, default=0)
    total_samples: Mapped[int] = mapped_column(Integer, default=0)
    samples_per_second: Mapped[float | None] = mapped_column(Float)

    # Results.
    train_loss: Mapped[float | None] = mapped_column(Float)
    test_loss: Mapped[float | None] = mapped_column(Float)
    test_accuracy: Mapped[float | None] = mapped_column(Float)
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    worker_hostname: Mapped[str | None] = mapped_column(String(255))
    # The registry id and process id of the worker that claimed the running attempt.
    worker_id: Mapped[str | None] = mapped_column(String(32))
    worker_pid: Mapped[int | None]

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    metrics: Mapped[list[Metric]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Metric.id"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Artifact.id"
    )


class Metric(Base):
    """One logged point: a train loss every ``log_interval`` batches or a test result."""

    __tablename__ = "metric"
    __table_args__ = (Index("ix_metric_job_kind_step", "job_id", "kind", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("job.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # "train" | "test"
    epoch: Mapped[int]
    step: Mapped[int]
    samples_seen: Mapped[int]
    loss: Mapped[float] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="metrics")


class Artifact(Base):
    """A file a job produced, kept in the artifact store under the job's folder."""

    __tablename__ = "artifact"
    __table_args__ = (Index("ux_artifact_job_name", "job_id", "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("job.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))  # relative path, e.g. checkpoints/epoch-1.pt
    kind: Mapped[str] = mapped_column(String(16))  # checkpoint | model | plot | log
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="artifacts")


class User(Base):
    """Someone who may call the API; admins see and manage every job."""

    __tablename__ = "user_account"  # "user" is a reserved word in PostgreSQL

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user", order_by="ApiToken.id")


class ApiToken(Base):
    """A bearer token of a user, stored only as its sha256; the clear token is shown once."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(16), unique=True)  # for listing and revoking
    user_id: Mapped[int] = mapped_column(Integer, ForeignKey("user_account.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship(back_populates="tokens")


class DashboardSession(Base):
    """A browser signed in to the dashboard with a token; it ends at sign-out or revocation.

    The cookie holds a random session id, this row only its sha256: the database (or a
    backup of it) and the signing key together still cannot make a working cookie.
    """

    __tablename__ = "dashboard_session"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("api_token.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Idle sessions end: a request after settings.session_idle_hours finds it gone.
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    token: Mapped[ApiToken] = relationship()


class Worker(Base):
    """A running worker process, as its own heartbeat last described it (the registry)."""

    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random, one per process
    name: Mapped[str] = mapped_column(String(255))  # the Celery node name, e.g. celery@host
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    queues: Mapped[str] = mapped_column(String(255))  # comma-separated, e.g. "cpu,maintenance"
    concurrency: Mapped[int]
    heartbeat_seconds: Mapped[float] = mapped_column(Float)  # liveness is judged by its own beat
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # "live", or "draining": an admin asked it to finish what it runs, take nothing new, exit.
    state: Mapped[str] = mapped_column(String(16), default=WorkerState.LIVE, server_default="live")


class Sweep(Base):
    """A hyperparameter search: its request, budget, state and the lease of its controller."""

    __tablename__ = "sweep"
    __table_args__ = (Index("ix_sweep_created_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=SweepStatus.RUNNING, index=True)
    method: Mapped[str] = mapped_column(String(16))  # grid | random | tpe
    # The validated request (parameters, metric, base, budget, early_terminate, seed).
    spec: Mapped[dict[str, Any]]
    # The budget as resolved at creation: a grid's max_trials is its size.
    max_trials: Mapped[int]
    max_concurrent: Mapped[int]
    max_failed: Mapped[int]
    owner_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("user_account.id"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))

    # Lease of the one controller acting on the sweep now (renewed at each of its passes).
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    controller: Mapped[str | None] = mapped_column(String(255))  # hostname:pid, for people

    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class EventKind(enum.StrEnum):
    """What a job event says: a log line, a state change, progress or a metric point."""

    LOG = "log"
    STATUS = "status"
    PROGRESS = "progress"
    METRIC = "metric"


class JobEvent(Base):
    """One thing that happened to a job, in order: its log and its live event stream.

    The id orders every event of a job (each writer holds the job row's lock while it
    appends), is the log's ``seq`` and the SSE ``id:`` a client resumes from.
    """

    __tablename__ = "job_event"
    __table_args__ = (Index("ix_job_event_job_kind_id", "job_id", "kind", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("job.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # an EventKind
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Train and test lines and metric points carry their epoch: a resumed attempt drops
    # those of the dead attempt past its checkpoint, which it trains again.
    epoch: Mapped[int | None]
    # Status changes say why (claimed, lease_expired, released, finished, ...).
    reason: Mapped[str | None] = mapped_column(String(32), index=True)
    message: Mapped[str | None] = mapped_column(Text)  # the log line
    data: Mapped[dict[str, Any] | None]  # the status, progress or metric payload
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A user's URL that is told, signed, when that user's jobs end."""

    __tablename__ = "webhook_endpoint"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("user_account.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(128))  # whsec_…, shown once at creation
    description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookDelivery(Base):
    """One event for one endpoint (the outbox row), written with the state change it tells of."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_…, the webhook-id
    endpoint_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("webhook_endpoint.id", ondelete="CASCADE"), index=True
    )
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|succeeded|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A sender holds the row while it posts, so two workers never send the same try.
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """One try of a delivery: what the receiver answered, or why it could not be reached."""

    __tablename__ = "webhook_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("webhook_delivery.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int]
    outcome: Mapped[str] = mapped_column(String(16), index=True)  # succeeded|failed|gone|refused
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
