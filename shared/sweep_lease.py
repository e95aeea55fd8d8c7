"""The sweep controller's lease: one controller acts on a sweep at a time, every write fenced.

Any number of processes run the controller duty; each pass a process tries to take (or
renew) the lease of every running sweep, and only the holder asks for trials, prunes and
ends the sweep. A controller that dies stops renewing; once its lease expires the next
process's pass takes the sweep over. Every write is guarded by ``WHERE lease_token = :mine``
(as ``shared.lease`` does for jobs), and trial numbers are unique per sweep, so even a
controller that lost its lease without knowing cannot add a duplicate trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db import transaction
from shared.lease import SessionFactory, _changed_one
from shared.models import Job, JobStatus, Sweep, SweepStatus, utcnow
from shared.sweeps import stop_trials

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepLease:
    """Proof that this process controls a sweep: the token it wrote into the sweep row."""

    sweep_id: str
    token: str


def running_sweeps(factory: SessionFactory) -> list[str]:
    """Ids of the sweeps still running, oldest first."""
    with factory() as session:
        stmt = select(Sweep.id).where(Sweep.status == SweepStatus.RUNNING)
        return list(session.scalars(stmt.order_by(Sweep.created_at)))


def take(
    factory: SessionFactory, sweep_id: str, *, token: str, controller: str, lease_seconds: float
) -> SweepLease | None:
    """Take or renew the sweep's lease: None while another live controller holds it."""
    now = utcnow()
    free = Sweep.lease_token.is_(None) | (Sweep.lease_token == token)
    with transaction(factory) as session:
        taken = _changed_one(
            session,
            update(Sweep)
            .where(
                Sweep.id == sweep_id,
                Sweep.status == SweepStatus.RUNNING,
                free | (Sweep.lease_expires_at < now),
            )
            .values(
                lease_token=token,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                controller=controller,
            ),
        )
    return SweepLease(sweep_id, token) if taken else None


def _fence(session: Session, lease: SweepLease) -> bool:
    """Check (and on PostgreSQL lock) that the running sweep still carries our token."""
    return _changed_one(
        session,
        update(Sweep)
        .where(
            Sweep.id == lease.sweep_id,
            Sweep.lease_token == lease.token,
            Sweep.status == SweepStatus.RUNNING,
        )
        .values(lease_token=lease.token),
    )


def add_trial(factory: SessionFactory, lease: SweepLease, job: Job) -> bool:
    """Insert a trial job under the lease; False when fenced out or the number is taken."""
    try:
        with transaction(factory) as session:
            if not _fence(session, lease):
                return False
            session.add(job)
    except IntegrityError:
        # (sweep_id, trial_number) is unique: a controller that lost its lease raced us.
        logger.warning("sweep %s: trial %s exists already", lease.sweep_id, job.trial_number)
        return False
    return True


def prune(factory: SessionFactory, lease: SweepLease, job_id: str) -> bool:
    """Stop a trial early: a running one at its next heartbeat, a queued one at once."""
    with transaction(factory) as session:
        if not _fence(session, lease):
            return False
        mine = (Job.id == job_id) & (Job.sweep_id == lease.sweep_id)
        ended = _changed_one(
            session,
            update(Job)
            .where(mine, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.PRUNED, prune_requested=True, finished_at=utcnow()),
        )
        return ended or _changed_one(
            session,
            update(Job)
            .where(mine, Job.status == JobStatus.RUNNING, Job.prune_requested.is_(False))
            .values(prune_requested=True),
        )


def finish(
    factory: SessionFactory, lease: SweepLease, status: SweepStatus, *, error: str | None = None
) -> bool:
    """End the sweep; a failed one stops its remaining trials. False when fenced out."""
    if status is SweepStatus.RUNNING:
        raise ValueError("finish() needs an end state")
    with transaction(factory) as session:
        if not _fence(session, lease):
            return False
        session.execute(
            update(Sweep)
            .where(Sweep.id == lease.sweep_id)
            .values(
                status=status,
                error_message=error,
                finished_at=utcnow(),
                lease_token=None,
                lease_expires_at=None,
            ),
            execution_options={"synchronize_session": False},
        )
        if status is not SweepStatus.COMPLETED:
            stop_trials(session, lease.sweep_id)
        else:
            _tell_completed(session, lease.sweep_id)
    return True


def _tell_completed(session: Session, sweep_id: str) -> None:
    """The ``sweep.completed`` webhook event, in the transaction that completes the sweep."""
    from shared.webhooks import enqueue_event

    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        return
    data = {"id": sweep.id, "name": sweep.name, "status": SweepStatus.COMPLETED.value,
            "method": sweep.method, "max_trials": sweep.max_trials}  # fmt: skip
    enqueue_event(session, sweep.owner_id, "sweep.completed", data)
