"""Routes of the workers and queues: who serves what, what waits, and draining a worker."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from api.auth import owner_scope, require_admin
from api.db import get_session
from api.openapi import operation
from api.serialize import dump, utc
from shared.models import utcnow
from shared.schemas import QueueListOut, QueueOut, WorkerListOut, WorkerOut
from shared.workers import (
    QueueView,
    WorkerView,
    list_workers,
    queue_summary,
    request_drain,
    state_of,
)

bp = Blueprint("workers", __name__, url_prefix="/api/v1")


def worker_out(view: WorkerView) -> WorkerOut:
    """A registry row with its state and jobs."""
    row = view.row
    return WorkerOut(
        id=row.id, name=row.name, hostname=row.hostname, pid=row.pid,
        queues=[q for q in row.queues.split(",") if q], slots=row.concurrency, jobs=view.jobs,
        started_at=utc(row.started_at), last_seen_at=utc(row.last_seen_at), state=view.state.value,
    )  # fmt: skip


def queue_out(view: QueueView) -> QueueOut:
    """One queue's counts."""
    return QueueOut(
        name=view.name, queued=view.queued, running=view.running,
        oldest_wait_seconds=view.oldest_wait_seconds, live_workers=view.live_workers,
    )  # fmt: skip


@bp.get("/workers")
@operation(summary="List workers", responses={200: WorkerListOut}, errors=(503,))
def index() -> ResponseReturnValue:
    """Every worker seen in the last hour: queues, slots, jobs it runs, last seen, state."""
    views = list_workers(get_session(), owner_id=owner_scope())
    return dump(WorkerListOut(items=[worker_out(view) for view in views]))


@bp.post("/workers/<worker_id>/drain")
@operation(
    summary="Drain a worker (admins only)", responses={202: WorkerOut}, errors=(403, 404, 503)
)
def drain(worker_id: str) -> ResponseReturnValue:
    """Ask a worker to finish what it runs, take no new job, and exit."""
    require_admin()
    session = get_session()
    row = request_drain(session, worker_id)
    jobs = [view.jobs for view in list_workers(session) if view.row.id == row.id]
    view = WorkerView(row, state_of(row, utcnow()), jobs[0] if jobs else [])
    return dump(worker_out(view)), 202


@bp.get("/queues")
@operation(summary="List queues", responses={200: QueueListOut}, errors=(503,))
def queues() -> ResponseReturnValue:
    """Per queue: jobs queued and running, the oldest wait in seconds, live workers."""
    items = [queue_out(view) for view in queue_summary(get_session())]
    return dump(QueueListOut(items=items))
