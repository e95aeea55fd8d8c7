"""The webhook sender: a periodic duty that posts due deliveries, signed (Standard Webhooks).

Runs in every worker's main process, in a maintenance lane of its own (worker/maintenance.py
LANES), so a slow receiver delays only other posts, never the reaper; each delivery is
leased to one sender while it posts (shared/webhooks.py), so any number may run. Posts go
out a few at a time with a short timeout.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import requests
import urllib3
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from shared import webhooks
from shared.config import Settings
from shared.models import utcnow
from shared.webhooks import InvalidWebhookUrl, Taken, Try

SENDERS = 8  # posts at once, and deliveries taken per pass
USER_AGENT = "mnistq-webhooks/1"
ERROR_BYTES = 200  # of a refusing receiver's body, kept as the try's error; the rest is unread


def deliver_webhooks(
    settings: Settings, factory: sessionmaker[Session], publish: Callable[[str, str], None]
) -> None:
    """One pass: take the due deliveries, post each, record every try."""
    del publish  # a duty's signature; webhooks publish nothing to the broker
    due = webhooks.take_due(factory, limit=SENDERS)
    if not due:
        return
    with ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook") as pool:
        results = list(pool.map(lambda taken: post(taken, settings), due))
    for taken, result in zip(due, results, strict=True):
        webhooks.record_try(factory, taken, result, settings.webhook_retry_seconds)


def post(taken: Taken, settings: Settings) -> Try:
    """Sign and post one delivery; what came of it."""
    try:
        # Checked again at each try: the name may resolve elsewhere than at creation.
        webhooks.check_url(taken.url, allow_private=settings.webhook_allow_private)
    except InvalidWebhookUrl as exc:
        return Try("refused", error=str(exc))
    body = json.dumps(taken.payload, separators=(",", ":"))
    now = utcnow()
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": taken.id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(taken.secret).sign(taken.id, now, body),
    }
    start = time.perf_counter()
    try:
        # No redirects: one to an internal address would get round the URL check. Streamed:
        # only the status and headers are awaited, and at most ERROR_BYTES of a body read, so
        # an endless or trickled answer costs neither memory nor time beyond one short read.
        response = requests.post(taken.url, data=body.encode(), headers=headers,
                                 timeout=settings.webhook_timeout_seconds,
                                 allow_redirects=False, stream=True)  # fmt: skip
    except requests.RequestException as exc:
        return Try("failed", error=f"{type(exc).__name__}: {exc}"[:500], duration_ms=_ms(start))
    with response:  # closing drops the connection with whatever body is left unread
        return _outcome(response, start)


def _outcome(response: requests.Response, start: float) -> Try:
    code = response.status_code
    if 200 <= code < 300:
        return Try("succeeded", status_code=code, duration_ms=_ms(start))
    if code == 410:
        return Try("gone", status_code=code, duration_ms=_ms(start))
    retry_after = retry_after_of(response.headers.get("Retry-After"))
    error = _body_head(response) or response.reason
    return Try("failed", status_code=code, error=error, duration_ms=_ms(start),
               retry_after=retry_after)  # fmt: skip


def _body_head(response: requests.Response) -> str:
    """The first ERROR_BYTES of the body as text; "" when it cannot be read in time."""
    try:
        head = response.raw.read(ERROR_BYTES, decode_content=True)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
        return ""
    return bytes(head or b"").decode(response.encoding or "utf-8", errors="replace")


def retry_after_of(value: str | None) -> timedelta | None:
    """A Retry-After header (seconds, or an HTTP date) as a wait; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(timedelta(0), when - datetime.now(UTC))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
