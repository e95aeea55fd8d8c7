"""The maintenance loop every worker's main process runs: its duties against a real database."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from shared import webhooks
from shared.auth import create_user
from shared.config import Settings
from shared.models import JobStatus, WebhookDelivery
from tests.integration.test_lease import add_job, claim, expire, get
from tests.webhook_receiver import Receiver, receiving
from worker.maintenance import MaintenanceLoop

Factory = sessionmaker[Session]
HANG_SECONDS = 3.0


@pytest.fixture
def hanging_receiver() -> Iterator[str]:
    """A receiver that takes HANG_SECONDS to answer each post."""
    with receiving(hold_seconds=HANG_SECONDS) as url:
        yield url


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
        while not Receiver.arrived and time.monotonic() < deadline:
            time.sleep(0.02)
        assert Receiver.arrived, "the webhook was never posted"
        expire(factory, job_id)  # its worker dies while the receiver holds the post
        # The reaper's passes go on meanwhile: the job is requeued and published well
        # before the receiver answers.
        while job_id not in published and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - Receiver.arrived[0] < HANG_SECONDS - 1
        assert get(factory, job_id).status == JobStatus.QUEUED and job_id in published
        while status_of(factory, delivery_id) != "succeeded":
            assert time.monotonic() < Receiver.arrived[0] + HANG_SECONDS + 2, "never recorded"
            time.sleep(0.1)
        assert len(Receiver.arrived) == 1
    finally:
        loop.stop()


def status_of(factory: Factory, delivery_id: str) -> str:
    with factory() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        return delivery.status
