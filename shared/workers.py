"""The worker registry: which workers are alive, which queues they serve, where a job waits.

Each worker's main process upserts its row every heartbeat interval and deletes it when it
shuts down gracefully. A worker that dies without saying goodbye is no longer live once it
missed ``LIVE_BEATS`` beats; its row is forgotten after ``FORGET_AFTER``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    CursorResult,
    Select,
    bindparam,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from shared.celery_app import QUEUES
from shared.db import transaction
from shared.lease import CLAIM_ORDER, as_utc
from shared.models import Job, JobStatus, Worker, WorkerState, utcnow

# A worker is live while its last beat is younger than this many of its own intervals.
LIVE_BEATS = 3
# Rows of workers that died without deleting their row are dropped after this long.
FORGET_AFTER = timedelta(hours=1)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself at every beat."""

    id: str
    name: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    heartbeat_seconds: float


@dataclass(frozen=True)
class QueueStatus:
    """Where a queued job stands: its place in its queue and who serves that queue."""

    position: int
    live_workers: int
    message: str | None


def new_worker_id() -> str:
    """A registry id for one worker process (node names repeat across processes on a host)."""
    return secrets.token_hex(16)


class WorkerNotFound(LookupError):
    """No live or recently seen worker has this id."""


@dataclass(frozen=True)
class WorkerView:
    """A worker as operators see it: its row, its state now and the jobs it runs."""

    row: Worker
    state: WorkerState
    jobs: list[str]


@dataclass(frozen=True)
class QueueView:
    """One queue now: what waits, what runs, how long the oldest waits, who serves it."""

    name: str
    queued: int
    running: int
    oldest_wait_seconds: float | None
    live_workers: int


def beat(factory: sessionmaker[Session], info: WorkerInfo) -> WorkerState:
    """Say ``info``'s worker is alive now (update its row, or insert it on the first beat);
    return the state its row asks for (``draining`` once an admin asked it to drain)."""
    now = utcnow()
    values: dict[str, Any] = {
        "name": info.name, "hostname": info.hostname, "pid": info.pid,
        "queues": ",".join(info.queues), "concurrency": info.concurrency,
        "heartbeat_seconds": info.heartbeat_seconds, "last_seen_at": now,
    }  # fmt: skip
    with transaction(factory) as session:
        # Only this worker's own thread writes its row, so update-then-insert cannot race.
        result = session.execute(
            update(Worker).where(Worker.id == info.id).values(**values),
            execution_options={"synchronize_session": False},
        )
        if cast("CursorResult[Any]", result).rowcount == 0:
            session.add(Worker(id=info.id, started_at=now, state=WorkerState.LIVE, **values))
        session.execute(delete(Worker).where(Worker.last_seen_at < now - FORGET_AFTER))
        state = session.scalar(select(Worker.state).where(Worker.id == info.id))
    return WorkerState(state or WorkerState.LIVE)


def is_draining(factory: sessionmaker[Session], worker_id: str | None) -> bool:
    """Whether an admin asked worker ``worker_id`` to drain (it claims nothing new)."""
    if worker_id is None:
        return False
    with factory() as session:
        state = session.scalar(select(Worker.state).where(Worker.id == worker_id))
    return state == WorkerState.DRAINING


def request_drain(session: Session, worker_id: str) -> Worker:
    """Ask a worker to finish what it runs, take nothing new and exit; WorkerNotFound."""
    changed = session.execute(
        update(Worker).where(Worker.id == worker_id).values(state=WorkerState.DRAINING),
        execution_options={"synchronize_session": False},
    )
    session.commit()
    row = session.get(Worker, worker_id, populate_existing=True)
    if cast("CursorResult[Any]", changed).rowcount == 0 or row is None:
        raise WorkerNotFound(f"no worker with id {worker_id!r}")
    return row


def running_jobs(factory: sessionmaker[Session], worker_id: str) -> list[str]:
    """Ids of the jobs that worker ``worker_id`` runs now, by the rows' own record."""
    with factory() as session:
        return list(session.scalars(_running_of([worker_id])))


def _running_of(worker_ids: Sequence[str], owner_id: int | None = None) -> Select[str]:
    stmt = select(Job.id).where(Job.status == JobStatus.RUNNING, Job.worker_id.in_(worker_ids))
    return stmt if owner_id is None else stmt.where(Job.owner_id == owner_id)


def state_of(worker: Worker, now: datetime) -> WorkerState:
    """``lost`` once it missed its beats, else what its row says."""
    return WorkerState(worker.state) if is_live(worker, now) else WorkerState.LOST


def list_workers(session: Session, *, owner_id: int | None = None) -> list[WorkerView]:
    """Every worker seen within FORGET_AFTER, oldest first, with the jobs it runs.

    With ``owner_id`` only that user's jobs are named (another user's are not shown).
    """
    now = utcnow()
    rows = session.scalars(
        select(Worker).where(Worker.last_seen_at >= now - FORGET_AFTER).order_by(Worker.started_at)
    ).all()
    jobs: dict[str, list[str]] = {row.id: [] for row in rows}
    ids = list(jobs)
    if ids:
        stmt = select(Job.id, Job.worker_id).where(Job.id.in_(_running_of(ids, owner_id)))
        for job_id, worker_id in session.execute(stmt.order_by(Job.started_at)):
            jobs[str(worker_id)].append(job_id)
    return [WorkerView(row, state_of(row, now), jobs[row.id]) for row in rows]


def queue_summary(session: Session) -> list[QueueView]:
    """Each queue (the known ones, and any a job or a worker names): counts and who serves it."""
    now = utcnow()
    counts = session.execute(
        select(Job.queue, Job.status, func.count(), func.min(Job.queued_at))
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .group_by(Job.queue, Job.status)
    ).all()
    workers = live_workers(session)
    names = set(QUEUES) | {row[0] for row in counts}
    names |= {queue for worker in workers for queue in worker.queues.split(",")}
    views = []
    for name in sorted(names):
        mine = {status: (count, oldest) for queue, status, count, oldest in counts if queue == name}
        queued, oldest = mine.get(JobStatus.QUEUED, (0, None))
        wait = (now - as_utc(oldest)).total_seconds() if oldest is not None else None
        serving = sum(1 for worker in workers if serves(worker, name))
        running = mine.get(JobStatus.RUNNING, (0, None))[0]
        views.append(QueueView(name, queued, running, wait, serving))
    return views


def remove(factory: sessionmaker[Session], worker_id: str) -> None:
    """Forget a worker that is shutting down: it serves no queue any more."""
    with transaction(factory) as session:
        session.execute(delete(Worker).where(Worker.id == worker_id))


def is_live(worker: Worker, now: datetime) -> bool:
    """True while the worker's last beat is within ``LIVE_BEATS`` of its intervals."""
    window = timedelta(seconds=LIVE_BEATS * worker.heartbeat_seconds)
    return now - as_utc(worker.last_seen_at) <= window


def live_workers(session: Session) -> list[Worker]:
    """The workers alive now, oldest first."""
    now = utcnow()
    rows = session.scalars(
        select(Worker).where(Worker.last_seen_at >= now - FORGET_AFTER).order_by(Worker.started_at)
    ).all()
    return [row for row in rows if is_live(row, now)]


def serves(worker: Worker, queue: str) -> bool:
    """True when ``worker`` takes new jobs from ``queue`` (a draining worker takes none)."""
    return worker.state != WorkerState.DRAINING and queue in worker.queues.split(",")


def no_worker_message(queue: str) -> str:
    """What a job waiting on a queue nobody serves tells its owner."""
    return (
        f"no live worker serves the {queue!r} queue; start one with: mnistq worker --queues {queue}"
    )


@cache
def _position_statement() -> Select[str, int]:
    """Per job id in ``:ids``, the number of queued jobs of its queue that a worker takes first."""
    # Built once: constructing this correlated statement costs more than running it.
    # The order is the claim's (shared.lease.CLAIM_ORDER): higher priority, then older.
    mine, ahead = Job.__table__.alias("mine"), Job.__table__.alias("ahead")
    older = tuple_(ahead.c.created_at, ahead.c.id) < tuple_(mine.c.created_at, mine.c.id)
    count_ahead = (
        select(func.count())
        .where(
            ahead.c.status == JobStatus.QUEUED,
            ahead.c.queue == mine.c.queue,
            (ahead.c.priority > mine.c.priority) | ((ahead.c.priority == mine.c.priority) & older),
        )
        .scalar_subquery()
    )
    ids: BindParameter[str] = bindparam("ids", expanding=True)
    return select(mine.c.id, count_ahead).where(
        mine.c.id.in_(ids), mine.c.status == JobStatus.QUEUED
    )


@cache
def _page_positions_statement() -> Select[str, int]:
    """The same numbers as ``_position_statement``, from one ranking of the queues' jobs."""
    ids: BindParameter[str] = bindparam("ids", expanding=True)
    # A lookup of its own, not correlated with the ranking's rows of the same table.
    their_queues = select(Job.queue).where(Job.id.in_(ids)).correlate(None).scalar_subquery()
    ranked = (
        select(
            Job.id,
            func.row_number().over(partition_by=Job.queue, order_by=CLAIM_ORDER).label("place"),
        )
        .where(Job.status == JobStatus.QUEUED, Job.queue.in_(their_queues))
        .subquery()
    )
    return select(ranked.c.id, ranked.c.place - 1).where(ranked.c.id.in_(ids))


def queue_positions(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """1-based place of each queued job in the order workers take its queue's jobs."""
    if not job_ids:
        return {}
    # One round trip either way, over queued rows only. One job: a count of those ahead of
    # it. A page: each count would cover the queue again (50 queued jobs among 1,000 took
    # 14 ms on PostgreSQL), where one ranking of the queues covers them once (2.2 ms); for
    # one job the ranking costs a sort the count does not (2.1 against 1.2 ms).
    statement = _position_statement() if len(job_ids) == 1 else _page_positions_statement()
    rows = session.execute(statement, {"ids": list(job_ids)}).all()
    return {job_id: int(before) + 1 for job_id, before in rows}


def queue_status(session: Session, jobs: Sequence[Job]) -> dict[str, QueueStatus]:
    """Where each queued job of ``jobs`` stands; two queries, none when nothing is queued."""
    queued = [job for job in jobs if job.status == JobStatus.QUEUED]
    if not queued:
        return {}
    positions = queue_positions(session, [job.id for job in queued])
    workers = live_workers(session)
    statuses = {}
    for job in queued:
        serving = sum(1 for worker in workers if serves(worker, job.queue))
        message = None if serving else no_worker_message(job.queue)
        statuses[job.id] = QueueStatus(positions.get(job.id, 1), serving, message)
    return statuses
