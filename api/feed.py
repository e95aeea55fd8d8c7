"""One poller per API process that hands new job events to every open stream.

However many streams are open, the process asks the database once per
``events_poll_seconds`` for events newer than the last it saw and gives each to the
streams it concerns (one job's, or all of one owner's). A stream reads its own backlog
(a replay after Last-Event-ID) from the database first, then follows this feed.
Threads under `mnistq up`; greenlets under gunicorn's gevent workers, which patch
``threading``, ``queue`` and ``time``. Backlogs are read a batch at a time, a few streams at
once (``replay_slots``), so clients replaying long logs take turns with every other request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import events
from shared.models import EventKind, Job, JobEvent, utcnow

logger = logging.getLogger(__name__)

BATCH = 1000
# Open streams replaying their backlog from the database at once, per process: replays are
# CPU work (rows to frames), and fifty clients opening long logs together must not starve
# the process's other requests of it.
REPLAY_SLOTS = 2
# Events of different jobs may commit out of id order: the poller looks back this far
# and sends what it had not seen, so an event committed late is still sent, once.
SETTLE = timedelta(seconds=5)
QUEUE_LIMIT = 10_000  # a stream this far behind is closed; its client resumes from the database


@dataclass(frozen=True)
class Item:
    """One event as the streams send it."""

    id: int
    job_id: str
    owner_id: int | None
    frame: str  # the SSE text of the event
    ends_job: bool  # a status event saying the job is finished


def frame(event: JobEvent) -> str:
    """One event in the SSE wire format; ``data`` is one line of JSON."""
    from api.serialize import utc

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


def item(event: JobEvent, owner_id: int | None) -> Item:
    """The stream item of a row."""
    ends = event.kind == EventKind.STATUS and bool((event.data or {}).get("finished"))
    return Item(event.id, event.job_id, owner_id, frame(event), ends)


@dataclass(eq=False)
class Subscription:
    """What one open stream receives: items that ``wants``, in a queue of its own."""

    wants: Callable[[Item], bool]
    items: queue.Queue[Item | None] = field(default_factory=lambda: queue.Queue(QUEUE_LIMIT))


@dataclass
class Feed:
    """The process's poller and its subscribers."""

    factory: sessionmaker[Session]
    poll_seconds: float
    subscribers: set[Subscription] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    after: int | None = None  # the window's start: every event at or below it was handed on
    seen: set[int] = field(default_factory=set)  # ids above ``after`` already handed on
    thread: threading.Thread | None = None
    replay_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(REPLAY_SLOTS)
    )

    def subscribe(self, wants: Callable[[Item], bool]) -> Subscription:
        """Start receiving new events (those committed from about now on)."""
        sub = Subscription(wants)
        with self.lock:
            if self.after is None:
                with self.factory() as session:
                    self.after = events.last_event_id(session)
            self.subscribers.add(sub)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="event-feed", daemon=True)
                self.thread.start()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop receiving; the poller stops with the last subscriber."""
        with self.lock:
            self.subscribers.discard(sub)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.poll_seconds):
            with self.lock:
                if not self.subscribers:
                    self.thread = None
                    return
            try:
                self.poll_once()
            except DBAPIError:
                logger.warning("event feed: database unavailable, trying again", exc_info=True)

    def poll_once(self) -> None:
        """Hand every event not seen yet to the subscribers that want it."""
        fresh = self._read()
        with self.lock:
            subscribers = list(self.subscribers)
        for new in fresh:
            for sub in subscribers:
                if sub.wants(new):
                    _offer(sub, new)

    def _read(self) -> list[Item]:
        after = self.after or 0
        with self.factory() as session:
            rows = session.execute(
                select(JobEvent, Job.owner_id)
                .join(Job, Job.id == JobEvent.job_id)
                .where(JobEvent.id > after)
                .order_by(JobEvent.id)
                .limit(BATCH)
            ).all()
        from api.serialize import utc

        fresh = [item(event, owner) for event, owner in rows if event.id not in self.seen]
        self.seen.update(new.id for new in fresh)
        old = [e.id for e, _ in rows if utc(e.created_at) < utcnow() - SETTLE]
        if len(rows) == BATCH:
            old.append(rows[-1][0].id)  # a burst: move on rather than read it again
        if old:
            self.after = max(after, *old)
            self.seen = {i for i in self.seen if i > self.after}
        return fresh


def _offer(sub: Subscription, new: Item) -> None:
    try:
        sub.items.put_nowait(new)
    except queue.Full:
        # A stream that does not keep up is ended (None); its client reconnects with
        # Last-Event-ID and catches up from the database.
        while True:
            try:
                sub.items.get_nowait()
            except queue.Empty:
                break
        sub.items.put_nowait(None)
