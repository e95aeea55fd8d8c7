"""A job's events: its line log and what its live stream replays, appended in order.

Every writer appends inside the transaction of the change it tells of and after it holds
the job row (a fenced or conditional UPDATE on it), so the events of one job are
committed in id order and a reader that resumes after an id misses none of that job's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, delete, select
from sqlalchemy.orm import Session

from shared import webhooks
from shared.models import EventKind, Job, JobEvent, JobStatus

MAX_PAGE = 1000


@dataclass(frozen=True, kw_only=True)
class NewEvent:
    """An event to append: a log line (``message``) or a payload (``data``)."""

    kind: EventKind
    message: str | None = None
    data: dict[str, Any] | None = None
    epoch: int | None = None  # train/test lines and metric points: the epoch they belong to
    reason: str | None = None  # status changes: why


def line(message: str, *, epoch: int | None = None, reason: str | None = None) -> NewEvent:
    """A log line; ``epoch`` for the seed's train and test lines, None for what happened."""
    return NewEvent(kind=EventKind.LOG, message=message, epoch=epoch, reason=reason)


# What a status event tells of the job; a writer that has these columns already (from its
# UPDATE's RETURNING) passes them to ``status_changed``, which then reads nothing.
STATE = (Job.status, Job.attempt, Job.worker_hostname, Job.error_message, Job.test_loss,
         Job.test_accuracy)  # fmt: skip


def append(
    session: Session, job_id: str, events: Sequence[NewEvent], *, attempt: int | None = None
) -> None:
    """Add ``events`` to the job's history, stamped with its current ``attempt`` (read from
    the row when not given)."""
    if not events:
        return
    if attempt is None:
        attempt = session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0
    session.add_all(
        JobEvent(
            job_id=job_id, kind=e.kind, attempt=attempt, epoch=e.epoch, reason=e.reason,
            message=e.message, data=e.data,
        )
        for e in events
    )  # fmt: skip
    session.flush()


def status_changed(
    session: Session,
    job_id: str,
    reason: str,
    message: str,
    state: Row[*tuple[Any, ...]] | None = None,
) -> None:
    """A status event with the job's state as it now is in this transaction (``state``: its
    ``STATE`` columns, read here when not given), and its line; for an end state, the webhook
    deliveries of ``job.succeeded`` / ``failed`` / ``cancelled``."""
    row = state or session.execute(select(*STATE).where(Job.id == job_id)).one()
    status = JobStatus(row.status)
    data: dict[str, Any] = {
        "status": status.value, "attempt": row.attempt, "reason": reason,
        "finished": status.finished, "worker": row.worker_hostname,
        "error": row.error_message, "test_loss": row.test_loss,
        "test_accuracy": row.test_accuracy,
    }  # fmt: skip
    # The line first: a stream that ends at a finished status has sent the job's last line.
    append(session, job_id, [
        line(message, reason=reason),
        NewEvent(kind=EventKind.STATUS, data=data, reason=reason),
    ], attempt=row.attempt)  # fmt: skip
    if status.finished:
        # The webhook outbox, in the same transaction as the change it tells of.
        webhooks.enqueue_job_finished(session, job_id)


def drop_superseded(session: Session, job_id: str, after_epoch: int) -> None:
    """Forget train/test lines and metric points past ``after_epoch``: they are trained again."""
    # A requeued job resumes from its checkpoint (or from scratch: after_epoch -1); what the
    # dead attempt logged after it would otherwise appear twice.
    session.execute(
        delete(JobEvent).where(
            JobEvent.job_id == job_id,
            JobEvent.kind.in_([EventKind.LOG, EventKind.METRIC]),
            JobEvent.epoch.is_not(None),
            JobEvent.epoch > after_epoch,
        ),
        execution_options={"synchronize_session": False},
    )


def log_lines(
    session: Session, job_id: str, *, after: int = 0, limit: int = MAX_PAGE
) -> list[JobEvent]:
    """The job's log lines with ``seq`` (id) above ``after``, oldest first."""
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == EventKind.LOG, JobEvent.id > after)
        .order_by(JobEvent.id)
        .limit(min(limit, MAX_PAGE))
    )
    return list(session.scalars(stmt))


def events_after(
    session: Session,
    *,
    after: int,
    job_id: str | None = None,
    owner_id: int | None = None,
    limit: int = 500,
) -> list[JobEvent]:
    """Events above ``after``: of one job, or of every job of ``owner_id`` (None: everyone's)."""
    stmt = select(JobEvent).where(JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    if job_id is not None:
        stmt = stmt.where(JobEvent.job_id == job_id)
    elif owner_id is not None:
        stmt = stmt.join(Job, Job.id == JobEvent.job_id).where(Job.owner_id == owner_id)
    return list(session.scalars(stmt))


def last_event_id(session: Session) -> int:
    """The newest event id of all (0 when there is none): where a fresh global stream starts."""
    return session.scalar(select(JobEvent.id).order_by(JobEvent.id.desc()).limit(1)) or 0
