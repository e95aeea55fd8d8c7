"""Routes of a job's events: its line log and the live streams (server-sent events)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.auth import owner_scope
from api.db import SESSIONS_KEY, get_session
from api.errors import field_error, validation_failed
from api.extensions import services
from api.inputs import query_args
from api.openapi import operation
from api.serialize import dump, utc
from shared import events
from shared.config import Settings
from shared.jobs import get_job
from shared.models import EventKind, Job, JobEvent, JobStatus, utcnow
from shared.schemas import MAX_EVENT_ID, EventsQuery, LogLineOut, LogPageOut, LogQuery

bp = Blueprint("events", __name__, url_prefix="/api/v1")

STREAM_MEDIA = ("text/event-stream",)
LAST_EVENT_ID = "Last-Event-ID"
BATCH = 500
# Events of different jobs may commit out of id order; the all-jobs stream looks back
# this far so that a row committed late is still sent (once).
SETTLE = timedelta(seconds=5)
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def line_out(event: JobEvent) -> LogLineOut:
    """A log event as a line of the log."""
    return LogLineOut(
        seq=event.id, time=utc(event.created_at), attempt=event.attempt, message=event.message or ""
    )


def _finished(session: Session, job_id: str) -> bool:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or JobStatus(status).finished


@bp.get("/jobs/<job_id>/logs")
@operation(summary="A job's log", query=LogQuery, responses={200: LogPageOut}, errors=(404, 422))
def logs(job_id: str) -> ResponseReturnValue:
    """A page of the job's log lines after ``after``; ``complete`` once nothing can follow."""
    query = query_args(LogQuery)
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    # The state is read before the lines: a job seen finished has every line committed.
    finished = JobStatus(job.status).finished
    lines = events.log_lines(session, job.id, after=query.after, limit=query.limit)
    next_after = lines[-1].id if lines else query.after
    out = LogPageOut(
        lines=[line_out(e) for e in lines],
        next_after=next_after,
        complete=finished and len(lines) < query.limit,
    )
    return dump(out)


@bp.get("/jobs/<job_id>/logs.txt")
@operation(summary="A job's whole log as text", responses={200: ("text/plain",)}, errors=(404,))
def logs_text(job_id: str) -> ResponseReturnValue:
    """Every line of the job's log, one per line."""
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    after, text = 0, list[str]()
    while batch := events.log_lines(session, job.id, after=after):
        text.extend(f"{e.message}\n" for e in batch)
        after = batch[-1].id
    return Response("".join(text), mimetype="text/plain")


def _start_after(default: int) -> int:
    """Where a stream resumes: Last-Event-ID (a reconnect), else ?after=, else ``default``."""
    query = query_args(EventsQuery)
    header = request.headers.get(LAST_EVENT_ID)
    if header is None or not header.strip():
        return default if query.after is None else query.after
    value = header.strip()
    if not value.isdigit() or int(value) > MAX_EVENT_ID:
        message = "must be the id of an event this API sent"
        raise validation_failed([field_error(["header", LAST_EVENT_ID], message)])
    return int(value)


@bp.get("/jobs/<job_id>/events")
@operation(
    summary="A job's live events (server-sent events)",
    query=EventsQuery,
    headers={LAST_EVENT_ID: "resume after this event id (browsers send it on reconnect)"},
    responses={200: STREAM_MEDIA},
    errors=(404, 422),
)
def job_stream(job_id: str) -> ResponseReturnValue:
    """status, progress, metric and log events of one job from the start; ``end`` at the end."""
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    stream = Stream(_factory(), services().settings, after=_start_after(0), job_id=job.id)
    return _sse(stream)


@bp.get("/events")
@operation(
    summary="Live events of all of the caller's jobs (server-sent events)",
    query=EventsQuery,
    headers={LAST_EVENT_ID: "resume after this event id (browsers send it on reconnect)"},
    responses={200: STREAM_MEDIA},
    errors=(422,),
)
def all_stream() -> ResponseReturnValue:
    """Events of every job the caller may see, from now (or after ``Last-Event-ID``)."""
    start = _start_after(events.last_event_id(get_session()))
    stream = Stream(_factory(), services().settings, after=start, owner_id=owner_scope())
    return _sse(stream)


def _factory() -> sessionmaker[Session]:
    factory: sessionmaker[Session] = current_app.extensions[SESSIONS_KEY]
    return factory


def _sse(stream: Stream) -> Response:
    # Not stream_with_context: the request's session is closed once the view returns, so an
    # open stream holds no database connection between its polls.
    return Response(stream.frames(), mimetype="text/event-stream", headers=STREAM_HEADERS)


def frame(event: JobEvent) -> str:
    """One event in the SSE wire format; ``data`` is one line of JSON."""
    payload: dict[str, Any] = {
        "job_id": event.job_id, "time": utc(event.created_at).isoformat(),
        "attempt": event.attempt,
    }  # fmt: skip
    if event.kind == EventKind.LOG:
        payload.update(seq=event.id, message=event.message)
    else:
        payload.update(event.data or {})
    data = json.dumps(payload, separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


@dataclass
class Stream:
    """One open stream: polls the database for events after the last one it sent."""

    factory: sessionmaker[Session]
    settings: Settings
    after: int
    job_id: str | None = None
    owner_id: int | None = None
    sent: set[int] = field(default_factory=set)

    def frames(self) -> Iterator[str]:
        """The stream's text: a retry hint, events as they come, keep-alives, ``end``."""
        yield "retry: 2000\n\n"
        deadline = time.monotonic() + self.settings.events_stream_seconds
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            batch, finished = self._poll()
            for event in batch:
                yield frame(event)
            if batch:
                quiet_since = time.monotonic()
            if finished and len(batch) < BATCH:
                yield "event: end\ndata: {}\n\n"
                return
            if time.monotonic() - quiet_since >= self.settings.events_keepalive_seconds:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            time.sleep(self.settings.events_poll_seconds)

    def _poll(self) -> tuple[list[JobEvent], bool]:
        """New events, and whether the (one) job is finished with all of them read."""
        with self.factory() as session:
            if self.job_id is not None:
                finished = _finished(session, self.job_id)  # before the events, see logs()
                batch = events.events_after(
                    session, after=self.after, job_id=self.job_id, limit=BATCH
                )
                if batch:
                    self.after = batch[-1].id
                return batch, finished
            return self._poll_all(session), False

    def _poll_all(self, session: Session) -> list[JobEvent]:
        rows = events.events_after(session, after=self.after, owner_id=self.owner_id, limit=BATCH)
        fresh = [e for e in rows if e.id not in self.sent]
        self.sent.update(e.id for e in fresh)
        # Move the window's start past events old enough that nothing can commit below them.
        settled = [e.id for e in rows if utc(e.created_at) < utcnow() - SETTLE]
        if settled or len(rows) == BATCH:
            self.after = max([*settled, rows[-1].id if len(rows) == BATCH else 0, self.after])
            self.sent = {i for i in self.sent if i > self.after}
        return fresh
