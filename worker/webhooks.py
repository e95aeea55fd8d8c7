"""The webhook sender: a periodic duty that posts due deliveries, signed (Standard Webhooks).

Runs in every worker's main process, in a maintenance lane of its own (worker/maintenance.py
LANES), so a slow receiver delays only other posts, never the reaper; each delivery is
leased to one sender while it posts (shared/webhooks.py), so any number may run. Posts go
out a few at a time, each within ``webhook_timeout_seconds`` from connect to last byte read.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import requests
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from shared import webhooks
from shared.config import Settings
from shared.models import utcnow
from shared.webhooks import InvalidWebhookUrl, Taken, Try

SENDERS = 8  # posts at once, and deliveries taken per pass
USER_AGENT = "mnistq-webhooks/1"
ERROR_BYTES = 200  # of a refusing receiver's body, kept as the try's error; the rest is unread
# The certificates requests trusts (certifi's): the same receivers verify as with requests.
_TLS = ssl.create_default_context(cafile=requests.certs.where())


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
        address = webhooks.check_url(taken.url, allow_private=settings.webhook_allow_private)
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
        answer = send(taken.url, address, body.encode(), headers, settings.webhook_timeout_seconds)
    except (OSError, http.client.HTTPException) as exc:
        return Try("failed", error=f"{type(exc).__name__}: {exc}"[:500], duration_ms=_ms(start))
    return _outcome(answer, _ms(start))


@dataclass(frozen=True)
class Answer:
    """What a receiver answered: its status line, headers and the first bytes of a refusal."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    head: bytes  # at most ERROR_BYTES of the body, read only when the status is not 2xx


class DeadlinePassed(OSError):
    """The receiver had not answered within the post's time."""


def send(
    url: str, address: str | None, body: bytes, headers: dict[str, str], seconds: float
) -> Answer:
    """POST ``body`` to ``url`` at ``address`` (the one the URL check passed; None: as the
    name resolves), all of it within ``seconds``: connect, send, answer, its first bytes.

    Connecting to the checked address means a name that resolves elsewhere a moment later
    (DNS rebinding) reaches nothing new; TLS still verifies the name. Redirects are not
    followed (one to an internal address would get round the check) and the rest of the
    body is never read. A timer hangs up at the deadline: a receiver that trickles its
    answer a byte at a time holds a sender no longer than one that does not answer.
    """
    parts = urlsplit(url)
    conn = _Connection(parts.scheme == "https", parts.hostname or "", parts.port, address,
                       seconds)  # fmt: skip
    timer = threading.Timer(seconds, conn.hang_up)
    timer.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        head = b"" if 200 <= response.status < 300 else response.read(ERROR_BYTES)
        return Answer(response.status, response.reason, response.headers, head)
    except (OSError, http.client.HTTPException) as exc:
        if conn.hung_up.is_set():
            raise DeadlinePassed(f"no whole answer within {seconds:g} s") from exc
        raise
    finally:
        timer.cancel()
        conn.close()


class _Connection(http.client.HTTPSConnection):
    """One post's connection to a chosen address: plain HTTP, or TLS verified for the host."""

    def __init__(
        self, tls: bool, host: str, port: int | None, address: str | None, seconds: float
    ) -> None:
        super().__init__(host, port or (443 if tls else 80), timeout=seconds, context=_TLS)
        self.tls, self.address = tls, address or host
        self.hung_up = threading.Event()
        self._lock = threading.Lock()  # self.sock, between connect and hang_up

    def connect(self) -> None:
        sock: socket.socket = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            sock = _TLS.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        with self._lock:
            self.sock = sock
            if self.hung_up.is_set():
                sock.shutdown(socket.SHUT_RDWR)
        if isinstance(sock, ssl.SSLSocket):
            sock.do_handshake()  # after self.sock is set: a hang-up ends a trickled handshake too

    def hang_up(self) -> None:
        """From the timer's thread: end the connection's reads and writes now."""
        with self._lock:
            self.hung_up.set()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)


def _outcome(answer: Answer, duration_ms: float) -> Try:
    code = answer.status
    if 200 <= code < 300:
        return Try("succeeded", status_code=code, duration_ms=duration_ms)
    if code == 410:
        return Try("gone", status_code=code, duration_ms=duration_ms)
    retry_after = retry_after_of(answer.headers.get("Retry-After"))
    error = _text(answer.head, answer.headers.get_content_charset()) or answer.reason
    return Try("failed", status_code=code, error=error, duration_ms=duration_ms,
               retry_after=retry_after)  # fmt: skip


def _text(data: bytes, charset: str | None) -> str:
    """``data`` decoded as the answer says, or as UTF-8 when it names no charset Python has."""
    try:
        return data.decode(charset or "utf-8", errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


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
