"""Routes of a job's events: its line log and the live streams (server-sent events)."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import owner_scope
from api.db import get_session, session_factory
from api.errors import field_error, validation_failed
from api.extensions import services
from api.feed import Feed, Item, Subscription, item
from api.inputs import query_args
from api.openapi import operation
from api.serialize import dump, utc
from shared import events
from shared.config import Settings
from shared.jobs import get_job
from shared.models import Job, JobEvent, JobStatus
from shared.schemas import MAX_EVENT_ID, EventsQuery, LogLineOut, LogPageOut, LogQuery

bp = Blueprint("events", __name__, url_prefix="/api/v1")

STREAM_MEDIA = ("text/event-stream",)
LAST_EVENT_ID = "Last-Event-ID"
END = "event: end\ndata: {}\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REPLAY_BATCH = 200  # backlog events read and sent at a time


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
    stream = Stream(_feed(), services().settings, after=_start_after(0), job_id=job.id)
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
    stream = Stream(_feed(), services().settings, after=start, owner_id=owner_scope())
    return _sse(stream)


FEED_KEY = "mnistq.feed"


def _feed() -> Feed:
    """The app's event feed, made on first use (in the serving process, after any fork)."""
    found: Feed | None = current_app.extensions.get(FEED_KEY)
    if found is None:
        factory = session_factory()
        made = Feed(factory, services().settings.events_poll_seconds)
        found = current_app.extensions.setdefault(FEED_KEY, made)
    return found


def _sse(stream: Stream) -> Response:
    # Not stream_with_context: the request's session is closed once the view returns, so an
    # open stream holds no database connection while it waits.
    return Response(stream.frames(), mimetype="text/event-stream", headers=STREAM_HEADERS)


@dataclass
class Stream:
    """One open stream: its backlog from the database, then what the feed hands it."""

    feed: Feed
    settings: Settings
    after: int
    job_id: str | None = None
    owner_id: int | None = None

    def wants(self, new: Item) -> bool:
        """The stream's job's events, or its owner's (None: an admin, everything)."""
        if self.job_id is not None:
            return new.job_id == self.job_id
        return self.owner_id is None or new.owner_id == self.owner_id

    def frames(self) -> Iterator[str]:
        """The stream's text: a retry hint, events as they come, keep-alives, ``end``."""
        sub = self.feed.subscribe(self.wants)  # before the backlog, so nothing falls between
        try:
            yield "retry: 2000\n\n"
            # The state is read before the events: a job seen finished has all of them.
            finished = self.job_id is not None and self._job_finished(self.job_id)
            sent: set[int] = set()  # the all-jobs stream's replayed ids: the feed may repeat them
            for batch in self._backlog():
                if self.job_id is None:
                    sent.update(new.id for new in batch)
                yield "".join(new.frame for new in batch)
            if finished:
                yield END
                return
            yield from self._follow(sub, sent)
        finally:
            self.feed.unsubscribe(sub)

    def _follow(self, sub: Subscription, sent: set[int]) -> Iterator[str]:
        deadline = time.monotonic() + self.settings.events_stream_seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                new = sub.items.get(timeout=min(left, self.settings.events_keepalive_seconds))
            except queue.Empty:
                yield ": keep-alive\n\n"
                continue
            if new is None:
                return  # fell behind: the client resumes from the database
            if new.id in sent or (self.job_id is not None and new.id <= self.after):
                continue
            yield new.frame
            if new.ends_job and self.job_id is not None:
                yield END
                return

    def _job_finished(self, job_id: str) -> bool:
        with self.feed.factory() as session:
            return _finished(session, job_id)

    def _backlog(self) -> Iterator[list[Item]]:
        """Events after ``after`` in the database, a batch at a time.

        A batch is read and framed holding one of the process's replay slots, and sent
        after letting it go: a slow reader holds no slot and no connection, and many streams
        replaying at once leave the CPU to other requests between their batches.
        """
        while True:
            with self.feed.replay_slots, self.feed.factory() as session:
                batch = [
                    item(e, self.owner_id)
                    for e in events.events_after(
                        session, after=self.after, job_id=self.job_id, owner_id=self.owner_id,
                        limit=REPLAY_BATCH,
                    )
                ]  # fmt: skip
            if not batch:
                return
            self.after = batch[-1].id
            yield batch
            time.sleep(0)  # a turn for the other streams and requests (a greenlet switch)
