"""The worker side of the job state machine: claim, heartbeat, fenced writes, requeue.

Every write a worker makes after its claim is guarded by ``WHERE lease_token = :mine``
(fencing): a worker whose lease expired and was handed to someone else writes nothing
more. The reaper's updates are conditional too, so two reapers at once are harmless.
Clocks: leases are stamped with the writer's UTC clock; hosts must agree to well within
``lease_seconds`` (NTP).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Update, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import events
from shared.db import transaction
from shared.events import NewEvent
from shared.models import (
    Artifact,
    EventKind,
    Job,
    JobStatus,
    Metric,
    Worker,
    WorkerState,
    utcnow,
)
from shared.schemas import progress_figures

logger = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]

# How much of a traceback a failed job keeps: the end is where the cause is.
TRACEBACK_TAIL_CHARS = 8000
# The longest a queued row waits between re-publications, in grace periods.
MAX_REPUBLISH_BACKOFF = 16
# The order workers take queued jobs in, and queue positions count in.
CLAIM_ORDER = (Job.priority.desc(), Job.created_at, Job.id)


@dataclass(frozen=True)
class Lease:
    """Proof that this worker runs ``job_id`` now: the token every later write is fenced by."""

    job_id: str
    token: str


@dataclass(frozen=True)
class HeartbeatResult:
    """What a heartbeat learnt: the lease is gone, the user asked to cancel, or a sweep to prune."""

    lost: bool
    cancel_requested: bool
    prune_requested: bool = False

    @property
    def ok(self) -> bool:
        """True when the job should keep running."""
        return not (self.lost or self.cancel_requested or self.prune_requested)


@dataclass(frozen=True)
class ProgressUpdate:
    """Where a running job is; written to the job row at every log interval."""

    epoch: int
    n_epochs: int
    step: int
    steps_per_epoch: int
    samples_seen: int
    total_samples: int
    samples_per_second: float | None
    train_loss: float | None


@dataclass(frozen=True)
class MetricRecord:
    """One metric row to insert (a train loss every log interval, or an epoch's test result)."""

    kind: str
    epoch: int
    step: int
    samples_seen: int
    loss: float
    accuracy: float | None
    seconds: float


def _mine(lease: Lease) -> ColumnElement[bool]:
    return (Job.id == lease.job_id) & (Job.lease_token == lease.token)


def _changed_one(session: Session, statement: Update) -> bool:
    """Run a conditional UPDATE; True when it changed exactly one row."""
    result = session.execute(statement, execution_options={"synchronize_session": False})
    return cast("CursorResult[Any]", result).rowcount == 1


def _fence(session: Session, lease: Lease) -> bool:
    """Check (and on PostgreSQL lock) the row still carries our token, for this transaction."""
    # A no-op UPDATE rather than a SELECT: it takes the row lock, so a reaper cannot
    # take the lease away between this check and our commit.
    return _changed_one(
        session,
        update(Job).where(_mine(lease)).values(lease_token=lease.token),
    )


def _progress_event(progress: ProgressUpdate) -> NewEvent:
    """What a live stream shows of a progress write: the job's progress as the API shows it."""
    fraction, eta = progress_figures(
        progress.samples_seen, progress.total_samples, progress.samples_per_second, running=True
    )
    data = {**asdict(progress), "fraction": fraction, "eta_seconds": eta}
    return NewEvent(kind=EventKind.PROGRESS, data=data)


def _metric_events(metrics: Sequence[MetricRecord]) -> list[NewEvent]:
    return [NewEvent(kind=EventKind.METRIC, data=asdict(m), epoch=m.epoch) for m in metrics]


def _insert_metrics(session: Session, job_id: str, metrics: Sequence[MetricRecord]) -> None:
    session.add_all(
        Metric(
            job_id=job_id,
            kind=m.kind,
            epoch=m.epoch,
            step=m.step,
            samples_seen=m.samples_seen,
            loss=m.loss,
            accuracy=m.accuracy,
            seconds=m.seconds,
        )
        for m in metrics
    )


@dataclass(frozen=True)
class Claimant:
    """Who takes a job: recorded on the row so operators (and tests) know what runs where."""

    hostname: str
    worker_id: str | None = None  # the worker's registry id
    pid: int | None = None  # the process that trains it


def claim_next(
    session_factory: SessionFactory,
    queues: Sequence[str] | QueueOf,
    *,
    claimant: Claimant,
    lease_seconds: float,
    max_running_per_user: int | None = None,
) -> Lease | None:
    """Take the best queued job of ``queues`` (highest priority, then oldest); None if none.
    ``QueueOf(job_id)`` names the queue a message came from by the job it names, and takes
    nothing while the claimant's worker is draining: what a message's claim needs, checked
    in the statement that claims, not in a round trip before it.

    The database is the queue: a broker message only wakes a worker, so a lost, duplicated
    or reordered message can never lose or reorder work. On PostgreSQL the candidate row is
    locked with SKIP LOCKED, so claimers at once take different jobs without waiting; on
    SQLite the one-statement UPDATE runs under the database's single write lock. With
    ``max_running_per_user``, jobs of a user who already runs that many wait (two claims at
    the same instant may each see room for one more: a fairness cap, not an exact quota).
    """
    now = utcnow()
    token = secrets.token_hex(16)
    eligible = [Job.status == JobStatus.QUEUED, *_queue_filter(queues, claimant.worker_id)]
    if max_running_per_user is not None:
        running = Job.__table__.alias("running")
        eligible.append(
            select(func.count())
            .where(running.c.owner_id == Job.owner_id, running.c.status == JobStatus.RUNNING)
            .scalar_subquery()
            < max_running_per_user
        )
    best = (
        select(Job.id)
        .where(*eligible)
        .order_by(*CLAIM_ORDER)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    with transaction(session_factory) as session:
        # One statement takes the job and returns what its claim line and status event tell.
        row = session.execute(
            update(Job)
            .where(Job.id == best, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                lease_token=token,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                heartbeat_at=now,
                attempt=Job.attempt + 1,
                started_at=func.coalesce(Job.started_at, now),
                worker_hostname=claimant.hostname,
                worker_id=claimant.worker_id,
                worker_pid=claimant.pid,
            )
            .returning(Job.id, *events.STATE),
            execution_options={"synchronize_session": False},
        ).first()
        if row is None:
            return None
        message = _claim_line(claimant, row.attempt)
        events.status_changed(session, row.id, "claimed", message, state=row)
    return Lease(row.id, token)


@dataclass(frozen=True)
class QueueOf:
    """The queue of job ``job_id``: the one its message was sent to (``claim_next``)."""

    job_id: str


def _queue_filter(
    queues: Sequence[str] | QueueOf, worker_id: str | None
) -> list[ColumnElement[bool]]:
    """The conditions on a candidate's queue: one of ``queues``, or ``QueueOf``'s with its
    worker not draining."""
    if not isinstance(queues, QueueOf):
        return [Job.queue.in_(list(queues))]
    named = Job.__table__.alias("named")
    conditions = [Job.queue == select(named.c.queue).where(named.c.id == queues.job_id)
                  .scalar_subquery()]  # fmt: skip
    if worker_id is not None:
        draining = select(Worker.id).where(
            Worker.id == worker_id, Worker.state == WorkerState.DRAINING
        )
        conditions.append(~draining.exists())
    return conditions


def _claim_line(claimant: Claimant, attempt: int) -> str:
    """``claimed by worker … (pid …) on host …, attempt n``: the log's first line of an attempt."""
    worker = f"worker {claimant.worker_id}" if claimant.worker_id else "a worker"
    pid = f" (pid {claimant.pid})" if claimant.pid else ""
    return f"claimed by {worker}{pid} on host {claimant.hostname}, attempt {attempt}"


def heartbeat(
    session_factory: SessionFactory, lease: Lease, lease_seconds: float
) -> HeartbeatResult:
    """Renew the lease; say whether it was lost or cancellation was requested."""
    now = utcnow()
    with transaction(session_factory) as session:
        flags = session.execute(
            update(Job)
            .where(_mine(lease), Job.status == JobStatus.RUNNING)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
            .returning(Job.cancel_requested, Job.prune_requested),
            execution_options={"synchronize_session": False},
        ).one_or_none()
    if flags is None:
        return HeartbeatResult(lost=True, cancel_requested=False)
    return HeartbeatResult(
        lost=False, cancel_requested=bool(flags[0]), prune_requested=bool(flags[1])
    )


def record_start(
    session_factory: SessionFactory, lease: Lease, *, device_used: str, pid: int
) -> bool:
    """Note the device the job really runs on and the process that trains it (the one its
    claim named, unless that one died before it got the job); False when fenced out."""
    with transaction(session_factory) as session:
        return _changed_one(
            session,
            update(Job).where(_mine(lease)).values(device_used=device_used, worker_pid=pid),
        )


def record_progress(
    session_factory: SessionFactory,
    lease: Lease,
    progress: ProgressUpdate | None,
    metrics: Sequence[MetricRecord] = (),
    lines: Sequence[NewEvent] = (),
) -> bool:
    """Write progress, metric rows and log lines in one transaction; False when fenced out."""
    with transaction(session_factory) as session:
        if not _fence(session, lease):
            return False
        if progress is not None:
            session.execute(
                update(Job)
                .where(_mine(lease))
                .values(
                    epoch=progress.epoch,
                    n_epochs=progress.n_epochs,
                    step=progress.step,
                    steps_per_epoch=progress.steps_per_epoch,
                    samples_seen=progress.samples_seen,
                    total_samples=progress.total_samples,
                    samples_per_second=progress.samples_per_second,
                    train_loss=progress.train_loss,
                ),
                execution_options={"synchronize_session": False},
            )
        _insert_metrics(session, lease.job_id, metrics)
        batch = [*_metric_events(metrics), *lines]
        events.append(session, lease.job_id, [*batch, *_maybe(progress)])
    return True


def _maybe(progress: ProgressUpdate | None) -> list[NewEvent]:
    return [] if progress is None else [_progress_event(progress)]


def record_metrics(
    session_factory: SessionFactory,
    lease: Lease,
    metrics: Sequence[MetricRecord],
    lines: Sequence[NewEvent] = (),
) -> bool:
    """Insert a batch of metric rows and log lines; False when fenced out."""
    return record_progress(session_factory, lease, None, metrics, lines)


def replace_metrics(
    session_factory: SessionFactory,
    lease: Lease,
    metrics: Sequence[MetricRecord],
    *,
    after_epoch: int = -1,
    lines: Sequence[NewEvent] = (),
) -> bool:
    """Make the job's metric history exactly ``metrics`` (a resumed checkpoint's history).

    The log keeps what earlier attempts wrote up to ``after_epoch`` (the checkpoint's; -1:
    none) and the ``lines`` saying how this attempt starts.
    """
    # A requeued job resumes from its newest checkpoint: rows the dead attempt wrote after
    # that checkpoint would be duplicated by the rerun, and rows it never flushed before
    # dying would be missing. The checkpoint's own history is the truth.
    with transaction(session_factory) as session:
        if not _fence(session, lease):
            return False
        session.execute(delete(Metric).where(Metric.job_id == lease.job_id))
        _insert_metrics(session, lease.job_id, metrics)
        events.drop_superseded(session, lease.job_id, after_epoch)
        events.append(session, lease.job_id, lines)
    return True


def record_artifact(
    session_factory: SessionFactory, lease: Lease, *, name: str, kind: str, size: int, sha256: str
) -> bool:
    """Insert or update the artifact row (job_id, name); False when fenced out."""
    with transaction(session_factory) as session:
        # The fence holds the job row, so no other writer races this select-then-write.
        if not _fence(session, lease):
            return False
        row = session.scalar(
            select(Artifact).where(Artifact.job_id == lease.job_id, Artifact.name == name)
        )
        if row is None:
            session.add(
                Artifact(job_id=lease.job_id, name=name, kind=kind, size=size, sha256=sha256)
            )
        else:
            row.kind, row.size, row.sha256, row.created_at = kind, size, sha256, utcnow()
    return True


def finish(
    session_factory: SessionFactory,
    lease: Lease,
    status: JobStatus,
    *,
    test_loss: float | None = None,
    test_accuracy: float | None = None,
    error_message: str | None = None,
    error_traceback: str | None = None,
    metrics: Sequence[MetricRecord] = (),
    lines: Sequence[NewEvent] = (),
    message: str | None = None,
) -> bool:
    """End the job in an end state with its last metrics; False when fenced out.

    ``message`` is the log's last line (default: the end state with its result or error).
    """
    if not status.finished:
        raise ValueError(f"finish() needs an end state, not {status!r}")
    values: dict[str, object] = {
        "status": status,
        "finished_at": utcnow(),
        "lease_token": None,
        "lease_expires_at": None,
    }
    if status is JobStatus.SUCCEEDED:
        values.update(test_loss=test_loss, test_accuracy=test_accuracy)
    if error_message is not None:
        values.update(error_message=error_message, error_traceback=_tail(error_traceback))
    with transaction(session_factory) as session:
        if not _fence(session, lease):
            return False
        _insert_metrics(session, lease.job_id, metrics)
        events.append(session, lease.job_id, [*_metric_events(metrics), *lines])
        session.execute(
            update(Job).where(_mine(lease)).values(**values),
            execution_options={"synchronize_session": False},
        )
        ending = message or _end_line(status, test_loss, test_accuracy, error_message)
        events.status_changed(session, lease.job_id, "finished", ending)
    return True


def _end_line(
    status: JobStatus, loss: float | None, accuracy: float | None, error: str | None
) -> str:
    if status is JobStatus.SUCCEEDED and loss is not None and accuracy is not None:
        return f"succeeded: test loss {loss:.4f}, accuracy {accuracy:.2%}"
    if status is JobStatus.FAILED:
        return f"failed: {error or 'no reason recorded'}"
    if status is JobStatus.CANCELLED:
        return "cancelled: stopped at the user's request"
    return str(status.value)


def _tail(text: str | None) -> str | None:
    if text is None or len(text) <= TRACEBACK_TAIL_CHARS:
        return text
    return "…" + text[-TRACEBACK_TAIL_CHARS:]


def release(session_factory: SessionFactory, lease: Lease) -> bool:
    """Hand a running job back to the queue now (graceful shutdown); False when fenced."""
    # The attempt is given back too: a worker that shut down cleanly did not fail the job,
    # and max_attempts counts workers that died.
    with transaction(session_factory) as session:
        released = _changed_one(
            session,
            update(Job)
            .where(_mine(lease), Job.status == JobStatus.RUNNING)
            .values(
                status=JobStatus.QUEUED,
                lease_token=None,
                lease_expires_at=None,
                attempt=Job.attempt - 1,
                queued_at=utcnow(),
                published_at=None,
            ),
        )
        if released:
            message = "the worker is shutting down: handed back to the queue, to resume"
            events.status_changed(session, lease.job_id, "released", message)
        return released


def requeue(
    session_factory: SessionFactory, lease: Lease, *, max_attempts: int, reason: str
) -> JobStatus | None:
    """Hand a running job back now for infrastructure trouble; the attempt counts, and a job
    out of attempts ends failed with ``reason``. A job whose cancel (or whose sweep's prune)
    was asked for ends so instead. The new status, or None when fenced."""
    running = (_mine(lease), Job.status == JobStatus.RUNNING)
    failed = f"{reason} (gave up after {max_attempts} attempts)"
    with transaction(session_factory) as session:
        row = session.execute(
            select(Job.attempt, Job.cancel_requested, Job.prune_requested)
            .where(*running)
            .with_for_update()
        ).first()
        if row is None:
            return None
        values = _handed_back(
            row.attempt, cancel=row.cancel_requested, prune=row.prune_requested,
            max_attempts=max_attempts, now=utcnow(), failed_message=failed,
        )  # fmt: skip
        session.execute(update(Job).where(*running).values(**values))
        status = JobStatus(str(values["status"]))
        kind, line = {
            JobStatus.CANCELLED: ("finished", f"{reason}; cancellation had been asked for"),
            JobStatus.PRUNED: ("finished", f"{reason}; its sweep had stopped it"),
            JobStatus.QUEUED: ("requeued", f"{reason}: queued again"),
            JobStatus.FAILED: ("finished", f"failed: {failed}"),
        }[status]
        events.status_changed(session, lease.job_id, kind, line)
        return status


def _handed_back(
    attempt: int, *, cancel: bool, prune: bool, max_attempts: int, now: datetime,
    failed_message: str,
) -> dict[str, object]:  # fmt: skip
    """The columns of a running job taken from its worker (handed back, or its lease
    expired): ended as asked (a cancel, then a sweep's prune: it was not going to go on
    anyway), queued again while it has attempts left, else failed with ``failed_message``."""
    ended = {"lease_token": None, "lease_expires_at": None, "finished_at": now}
    if cancel:
        return {"status": JobStatus.CANCELLED, **ended}
    if prune:
        return {"status": JobStatus.PRUNED, **ended}
    if attempt >= max_attempts:
        return {"status": JobStatus.FAILED, "error_message": failed_message, **ended}
    return {
        "status": JobStatus.QUEUED,
        "lease_token": None,
        "lease_expires_at": None,
        "queued_at": now,
        "published_at": None,
    }


@dataclass(frozen=True)
class Expired:
    """What the reaper did with running jobs whose lease expired."""

    requeued: list[str]
    failed: list[str]
    cancelled: list[str]
    pruned: list[str] = field(default_factory=list)


def requeue_expired(session_factory: SessionFactory, *, max_attempts: int) -> Expired:
    """Requeue running jobs whose lease expired; fail those that used up their attempts."""
    now = utcnow()
    with transaction(session_factory) as session:
        rows = session.execute(
            select(
                Job.id, Job.lease_token, Job.attempt, Job.cancel_requested, Job.prune_requested
            ).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        ).all()
    done = Expired([], [], [])
    for job_id, token, attempt, cancel, prune in rows:
        failed = (
            f"the worker running this job stopped responding {attempt} times "
            f"(max_attempts={max_attempts}); the workers kept dying, giving up"
        )
        values = _handed_back(
            attempt, cancel=cancel, prune=prune, max_attempts=max_attempts, now=now,
            failed_message=failed,
        )  # fmt: skip
        outcome = str(values["status"])
        if _take_expired(session_factory, job_id, token, now, values):
            {
                "queued": done.requeued, "failed": done.failed,
                "cancelled": done.cancelled, "pruned": done.pruned,
            }[outcome].append(job_id)  # fmt: skip
            logger.warning("job %s: lease expired on attempt %d → %s", job_id, attempt, outcome)
    return done


def _take_expired(
    session_factory: SessionFactory,
    job_id: str,
    token: str | None,
    now: datetime,
    values: dict[str, object],
) -> bool:
    # Conditional on the token we saw and the expiry: a heartbeat that just renewed the
    # lease, or another reaper that got there first, makes this a no-op.
    with transaction(session_factory) as session:
        taken = _changed_one(
            session,
            update(Job)
            .where(
                Job.id == job_id,
                Job.status == JobStatus.RUNNING,
                Job.lease_token == token,
                Job.lease_expires_at < now,
            )
            .values(**values),
        )
        if taken:
            events.status_changed(session, job_id, "lease_expired", _expired_line(values))
        return taken


def _expired_line(values: dict[str, object]) -> str:
    status = values["status"]
    lost = "lease lost: the worker stopped renewing it (killed, frozen or cut off)"
    if status == JobStatus.QUEUED:
        return f"{lost}; queued again, to resume from its newest checkpoint"
    if status == JobStatus.CANCELLED:
        return f"{lost}; cancellation had been asked for: cancelled"
    if status == JobStatus.PRUNED:
        return f"{lost}; its sweep had stopped it: pruned"
    return f"{lost}; failed: {values.get('error_message')}"


def republish_due(
    session_factory: SessionFactory,
    publish: Callable[[str, str], None],
    *,
    grace_seconds: float,
    limit: int = 100,
) -> list[str]:
    """Publish queued jobs whose message may be lost again; return the ids published."""
    now = utcnow()
    return [
        job_id
        for job_id, queue, previous in _due_for_publish(session_factory, now, grace_seconds, limit)
        # False: another reaper took it, or it was claimed meanwhile.
        if publish_stamped(session_factory, job_id, queue, publish, previous=previous)
    ]


def publish_stamped(
    session_factory: SessionFactory,
    job_id: str,
    queue: str,
    publish: Callable[[str, str], None],
    *,
    previous: datetime | None = None,
) -> bool:
    """Stamp the queued job's ``published_at`` (compare-and-set from ``previous``), commit,
    then send its message; False, sending nothing, if another process stamped it first. If
    sending fails the stamp is put back (the reaper's next pass sends it) and the error raised.

    Every publisher (the API's submit, the sweep controller, the reaper) goes through here,
    stamp first: a stamp's UPDATE holds the row's lock until it commits, and a worker woken
    by the message within that moment would pass the locked row by (SKIP LOCKED), find
    nothing to claim and leave the job to the reaper's grace period. A process that dies
    between the stamp and the send leaves a row the reaper sends once the grace has passed.
    """
    now = utcnow()
    if not _stamp_published(session_factory, job_id, previous, now):
        return False
    try:
        publish(job_id, queue)
    except Exception:
        _stamp_published(session_factory, job_id, now, previous)
        raise
    return True


def publish_created(
    session_factory: SessionFactory,
    job_id: str,
    queue: str,
    stamped: datetime,
    publish: Callable[[str, str], None],
) -> None:
    """Send the message of a job stored with ``published_at = stamped`` by the transaction
    that created it: the row is committed, stamped, before any worker is woken, as
    ``publish_stamped`` does in a transaction of its own. If sending fails the stamp is put
    back (the reaper's next pass sends it) and the error raised."""
    try:
        publish(job_id, queue)
    except Exception:
        _stamp_published(session_factory, job_id, stamped, None)
        raise


def _due_for_publish(
    session_factory: SessionFactory, now: datetime, grace_seconds: float, limit: int
) -> list[tuple[str, str, datetime | None]]:
    """Queued rows never published, or published long enough ago (with back-off)."""
    grace = timedelta(seconds=grace_seconds)
    with transaction(session_factory) as session:
        rows = session.execute(
            select(Job.id, Job.queue, Job.published_at, Job.queued_at)
            .where(
                Job.status == JobStatus.QUEUED,
                Job.published_at.is_(None) | (Job.published_at < now - grace),
            )
            .order_by(*CLAIM_ORDER)
            .limit(limit * 4)
        ).all()
    due = [
        (job_id, queue, published)
        for job_id, queue, published, queued in rows
        if published is None
        or _backoff_over(as_utc(published), as_utc(queued or published), now, grace)
    ]
    return due[:limit]


def _backoff_over(published: datetime, queued: datetime, now: datetime, grace: timedelta) -> bool:
    # A job that waits behind a long queue is not lost; re-publishing it every grace
    # period would fill the broker with duplicates. The wait between re-publications
    # doubles with the job's age (published - queued) and is capped, so a job gets
    # O(log(age)) duplicates while a truly lost message is found within 16 grace periods.
    wait = min(max(grace, published - queued), grace * MAX_REPUBLISH_BACKOFF)
    return now - published >= wait


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime."""
    # SQLite hands back naive datetimes (UTC by construction), PostgreSQL aware ones.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _stamp_published(
    session_factory: SessionFactory, job_id: str, expected: datetime | None, new: datetime | None
) -> bool:
    """Compare-and-set published_at, so of two reapers only one publishes a row."""
    with transaction(session_factory) as session:
        seen = Job.published_at.is_(None) if expected is None else Job.published_at == expected
        return _changed_one(
            session,
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, seen)
            .values(published_at=new),
        )
