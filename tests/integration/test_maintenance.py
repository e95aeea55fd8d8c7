"""The maintenance loop every worker's main process runs: its duties against a real database."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared import webhooks
from shared.auth import create_user
from shared.config import Settings
from shared.models import JobStatus, WebhookDelivery
from tests.integration.test_lease import add_job, claim, expire, get
from worker.maintenance import MaintenanceLoop

Factory = sessionmaker[Session]
HANG_SECONDS = 3.0


class Hanging(BaseHTTPRequestHandler):
    """A webhook receiver that takes HANG_SECONDS to answer each post."""

    posts: list[float] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Hanging.posts.append(time.monotonic())
        time.sleep(HANG_SECONDS)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hanging_receiver() -> Iterator[str]:
    Hanging.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hanging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_a_slow_webhook_receiver_does_not_hold_up_the_reaper(
    factory: Factory, hanging_receiver: str
) -> None:
    with factory() as session:
        user, _ = create_user(session, f"u{uuid.uuid4().hex[:8]}")
        endpoint = webhooks.create_endpoint(
            session, user.id, url=hanging_receiver, event_types=["job.succeeded"],
            description=None, allow_private=True,
        )  # fmt: skip
        delivery_id = webhooks.enqueue_test(session, endpoint)
    job_id = add_job(factory)
    assert claim(factory, job_id) is not None
    published: list[str] = []
    settings = Settings(reaper_interval_seconds=0.1, webhook_allow_private=True,
                        webhook_timeout_seconds=HANG_SECONDS + 2)  # fmt: skip
    loop = MaintenanceLoop(settings, factory, lambda job, _queue: published.append(job)).start()
    try:
        deadline = time.monotonic() + 10
        while not Hanging.posts and time.monotonic() < deadline:
            time.sleep(0.02)
        assert Hanging.posts, "the webhook was never posted"
        expire(factory, job_id)  # its worker dies while the receiver holds the post
        # The reaper's passes go on meanwhile: the job is requeued and published well
        # before the receiver answers.
        while job_id not in published and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - Hanging.posts[0] < HANG_SECONDS - 1
        assert get(factory, job_id).status == JobStatus.QUEUED and job_id in published
        while status_of(factory, delivery_id) != "succeeded":
            assert time.monotonic() < Hanging.posts[0] + HANG_SECONDS + 2, "never recorded"
            time.sleep(0.1)
        assert len(Hanging.posts) == 1
    finally:
        loop.stop()


def status_of(factory: Factory, delivery_id: str) -> str:
    with factory() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        return delivery.status
