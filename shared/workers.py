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

from shared.db import transaction
from shared.lease import as_utc
from shared.models import Job, JobStatus, Worker, utcnow

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


def beat(factory: sessionmaker[Session], info: WorkerInfo) -> None:
    """Say ``info``'s worker is alive now: update its row, or insert it on the first beat."""
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
            session.add(Worker(id=info.id, started_at=now, **values))
        session.execute(delete(Worker).where(Worker.last_seen_at < now - FORGET_AFTER))


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
    """True when ``worker`` consumes from ``queue``."""
    return queue in worker.queues.split(",")


def no_worker_message(queue: str) -> str:
    """What a job waiting on a queue nobody serves tells its owner."""
    return (
        f"no live worker serves the {queue!r} queue; start one with: mnistq worker --queues {queue}"
    )


@cache
def _positions_statement() -> Select[str, int]:
    """Per job id in ``:ids``, the number of queued jobs of its queue before it."""
    # Built once: constructing this correlated statement costs more than running it.
    mine, ahead = Job.__table__.alias("mine"), Job.__table__.alias("ahead")
    count_ahead = (
        select(func.count())
        .where(
            ahead.c.status == JobStatus.QUEUED,
            ahead.c.queue == mine.c.queue,
            tuple_(ahead.c.queued_at, ahead.c.id) < tuple_(mine.c.queued_at, mine.c.id),
        )
        .scalar_subquery()
    )
    ids: BindParameter[str] = bindparam("ids", expanding=True)
    return select(mine.c.id, count_ahead).where(
        mine.c.id.in_(ids), mine.c.status == JobStatus.QUEUED
    )


def queue_positions(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """1-based place of each queued job among the queued jobs of its queue, by queued_at."""
    if not job_ids:
        return {}
    # One round trip for a whole page; each count runs over queued rows only (ix_job_status).
    rows = session.execute(_positions_statement(), {"ids": list(job_ids)}).all()
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
