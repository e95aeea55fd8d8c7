"""Webhooks: users' endpoints, the outbox of deliveries and their retry state machine.

An event is written as one delivery row per subscribed endpoint in the same transaction as
the state change it tells of (``enqueue_event``), so none is lost or invented. Senders
(a periodic duty in every worker's main process, worker/webhooks.py) take a due delivery
with a lease (compare-and-set), post it, and record the try and its outcome fenced by that
lease, so several senders never send the same try twice.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.models import (
    Job,
    JobStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)

JOB_EVENTS = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled",
}
EVENT_TYPES = ("job.succeeded", "job.failed", "job.cancelled", "sweep.completed")
TEST_EVENT = "webhook.test"
SEND_LEASE = timedelta(seconds=60)
MAX_RETRY_AFTER = timedelta(days=1)


class WebhookNotFound(LookupError):
    """No endpoint with this id (or one of another user's)."""


class InvalidWebhookUrl(ValueError):
    """A URL mnistq will not post to (not http(s), does not resolve, or an internal address)."""


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def new_message_id() -> str:
    """A delivery's id, the ``webhook-id`` header receivers deduplicate on."""
    return "msg_" + secrets.token_hex(16)


def check_url(url: str, *, allow_private: bool) -> str | None:
    """InvalidWebhookUrl unless ``url`` is http(s) to a host whose addresses are all public;
    the first of them, to connect to (None when private addresses are allowed: unchecked)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhookUrl("must be an http:// or https:// URL with a host")
    if allow_private:
        return None
    try:
        infos = socket.getaddrinfo(parts.hostname, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidWebhookUrl(f"the host {parts.hostname!r} does not resolve") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise InvalidWebhookUrl(f"the host {parts.hostname!r} does not resolve")
    for found in addresses:
        address = ipaddress.ip_address(found.split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InvalidWebhookUrl(
                f"resolves to {address}, a loopback, private or link-local address "
                "(MNISTQ_WEBHOOK_ALLOW_PRIVATE=true allows it)"
            )
    return addresses[0]


def create_endpoint(
    session: Session,
    owner_id: int,
    *,
    url: str,
    event_types: Sequence[str],
    description: str | None,
    allow_private: bool,
) -> WebhookEndpoint:
    """Store a new endpoint with a fresh secret and commit; InvalidWebhookUrl first."""
    check_url(url, allow_private=allow_private)
    endpoint = WebhookEndpoint(
        owner_id=owner_id, url=url, events=sorted(set(event_types)), secret=new_secret(),
        description=description,
    )  # fmt: skip
    session.add(endpoint)
    session.commit()
    return endpoint


def get_endpoint(session: Session, endpoint_id: str, *, owner_id: int | None) -> WebhookEndpoint:
    """The endpoint ``endpoint_id``; WebhookNotFound if there is none the caller may see."""
    endpoint = session.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 32 else None
    if endpoint is None or (owner_id is not None and endpoint.owner_id != owner_id):
        raise WebhookNotFound(f"no webhook endpoint with id {endpoint_id!r}")
    return endpoint


def list_endpoints(session: Session, *, owner_id: int | None) -> list[WebhookEndpoint]:
    """The caller's endpoints (an admin's: everyone's), oldest first."""
    stmt = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if owner_id is not None:
        stmt = stmt.where(WebhookEndpoint.owner_id == owner_id)
    return list(session.scalars(stmt))


def deliveries_of(
    session: Session, endpoint_id: str, limit: int = 100
) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    """The endpoint's newest deliveries, each with every try made."""
    rows = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id)
            .limit(limit)
        )
    )
    tries: dict[str, list[WebhookAttempt]] = {row.id: [] for row in rows}
    if rows:
        stmt = select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(tries)))
        for attempt in session.scalars(stmt.order_by(WebhookAttempt.number)):
            tries[attempt.delivery_id].append(attempt)
    return [(row, tries[row.id]) for row in rows]


def enqueue_event(
    session: Session, owner_id: int | None, event_type: str, data: dict[str, Any]
) -> list[str]:
    """Write the event for each of the owner's live endpoints that subscribe to it.

    Call it inside the transaction of the change the event tells of (the sweep controller
    does for ``sweep.completed``); returns the delivery ids.
    """
    if owner_id is None:
        return []
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.owner_id == owner_id, WebhookEndpoint.disabled_at.is_(None)
        )
    ).all()
    return [
        _add_delivery(session, endpoint.id, event_type, data)
        for endpoint in endpoints
        if event_type in endpoint.events
    ]


def enqueue_test(session: Session, endpoint: WebhookEndpoint) -> str:
    """A ``webhook.test`` event for this endpoint alone; commit; its delivery id."""
    delivery = _add_delivery(session, endpoint.id, TEST_EVENT, {"endpoint_id": endpoint.id})
    session.commit()
    return delivery


def _add_delivery(session: Session, endpoint_id: str, event_type: str, data: dict[str, Any]) -> str:
    now = utcnow()
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    delivery = WebhookDelivery(
        id=new_message_id(), endpoint_id=endpoint_id, event_type=event_type, payload=payload,
        status="pending", attempts=0, next_attempt_at=now, created_at=now,
    )  # fmt: skip
    session.add(delivery)
    session.flush()
    return delivery.id


def enqueue_job_finished(session: Session, job_id: str) -> None:
    """``job.succeeded`` / ``job.failed`` / ``job.cancelled`` for the job as it now is."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return
    event_type = JOB_EVENTS.get(JobStatus(job.status))
    if event_type is not None:
        enqueue_event(session, job.owner_id, event_type, job_summary(job))


def job_summary(job: Job) -> dict[str, Any]:
    """What a job event carries: the job's state and results, not its whole JSON."""
    return {
        "id": job.id, "name": job.name, "status": job.status, "attempt": job.attempt,
        "queue": job.queue, "hyperparameters": job.hyperparameters,
        "test_loss": job.test_loss, "test_accuracy": job.test_accuracy,
        "error": job.error_message,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }  # fmt: skip


def _iso(when: datetime | None) -> str | None:
    from shared.lease import as_utc

    return None if when is None else as_utc(when).isoformat()


@dataclass(frozen=True)
class Taken:
    """A delivery a sender holds: what to post where, and the lease its record is fenced by."""

    id: str
    token: str
    url: str
    secret: str
    payload: dict[str, Any]
    attempts: int  # tries made before this one


def take_due(factory: sessionmaker[Session], limit: int = 20) -> list[Taken]:
    """Deliveries due now, each leased to this sender (another sender skips them)."""
    now = utcnow()
    free = or_(WebhookDelivery.lease_expires_at.is_(None), WebhookDelivery.lease_expires_at < now)
    due = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now, free)
    with transaction(factory) as session:
        ids = session.scalars(
            select(WebhookDelivery.id).where(*due).order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()  # fmt: skip
    taken = []
    for delivery_id in ids:
        token = secrets.token_hex(16)
        with transaction(factory) as session:
            result = session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, *due)
                .values(lease_token=token, lease_expires_at=now + SEND_LEASE),
                execution_options={"synchronize_session": False},
            )  # fmt: skip
            if getattr(result, "rowcount", 0) != 1:
                continue  # another sender took it first
            row = session.execute(
                select(WebhookDelivery, WebhookEndpoint).join(WebhookEndpoint)
                .where(WebhookDelivery.id == delivery_id)
            ).one()  # fmt: skip
            delivery, endpoint = row
            taken.append(Taken(delivery.id, token, endpoint.url, endpoint.secret,
                               dict(delivery.payload), delivery.attempts))  # fmt: skip
    return taken


@dataclass(frozen=True)
class Try:
    """What one post gave: an outcome (succeeded, failed, gone, refused) and its details."""

    outcome: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None
    retry_after: timedelta | None = None  # from the receiver's Retry-After


def record_try(
    factory: sessionmaker[Session], taken: Taken, result: Try, retry_delays: Sequence[float]
) -> bool:
    """Log the try and move the delivery on (done, retry later, or given up); False if fenced.

    ``retry_delays`` are the waits after the 1st, 2nd, … failed try: a delivery gets
    ``len(retry_delays) + 1`` tries; a Retry-After longer than the wait is honoured.
    """
    number = taken.attempts + 1
    now = utcnow()
    values: dict[str, Any] = {"attempts": number, "lease_token": None, "lease_expires_at": None}
    if result.outcome == "succeeded":
        values.update(status="succeeded", finished_at=now)
    elif result.outcome in ("gone", "refused") or number > len(retry_delays):
        values.update(status="failed", finished_at=now)
    else:
        wait = timedelta(seconds=retry_delays[number - 1])
        if result.retry_after is not None:
            wait = max(wait, min(result.retry_after, MAX_RETRY_AFTER))
        values.update(next_attempt_at=now + wait)
    with transaction(factory) as session:
        changed = session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == taken.id, WebhookDelivery.lease_token == taken.token)
            .values(**values),
            execution_options={"synchronize_session": False},
        )
        if getattr(changed, "rowcount", 0) != 1:
            return False
        session.add(WebhookAttempt(
            delivery_id=taken.id, number=number, outcome=result.outcome,
            status_code=result.status_code, error=result.error, duration_ms=result.duration_ms,
            created_at=now,
        ))  # fmt: skip
        if result.outcome == "gone":
            _disable(session, taken.id, "the receiver answered 410 Gone")
    return True


def _disable(session: Session, delivery_id: str, reason: str) -> None:
    """Stop sending to the delivery's endpoint: no new events, pending ones dropped."""
    endpoint_id = session.scalar(
        select(WebhookDelivery.endpoint_id).where(WebhookDelivery.id == delivery_id)
    )
    now = utcnow()
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=now, disabled_reason=reason)
    )
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
        .values(status="failed", finished_at=now)
    )
