"""GET /metrics: Prometheus text that parses, figures equal to the database, access rules."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from shared import events
from shared.models import JobStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from tests.api.conftest import Caller, client_as, insert_job, make_settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a scrape."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_job_figures_equal_the_database(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    for status, queue, wait, run in [
        (JobStatus.SUCCEEDED, "cpu", 3, 40), (JobStatus.SUCCEEDED, "cpu", 0.2, 700),
        (JobStatus.FAILED, "cpu", 1, 2), (JobStatus.CANCELLED, "gpu", None, None),
        (JobStatus.QUEUED, "cpu", None, None), (JobStatus.RUNNING, "cpu", 20, None),
    ]:  # fmt: skip
        started = now - timedelta(seconds=1000) if wait is not None else None
        insert_job(
            sessions, status=status, queue=queue,
            created_at=started - timedelta(seconds=wait) if started and wait else now,
            queued_at=now - timedelta(seconds=30), started_at=started,
            finished_at=started + timedelta(seconds=run) if started and run else None,
        )  # fmt: skip
    expired = insert_job(sessions, status=JobStatus.QUEUED, queue="cpu", attempt=1)
    with sessions() as session, session.begin():
        events.status_changed(session, expired, "lease_expired", "lease lost")
    got = samples(client.get("/metrics").get_data(as_text=True))
    jobs = {labels: v for (name, labels), v in got.items() if name == "mnistq_jobs"}
    assert jobs == {
        (("queue", "cpu"), ("status", "succeeded")): 2, (("queue", "cpu"), ("status", "failed")): 1,
        (("queue", "gpu"), ("status", "cancelled")): 1, (("queue", "cpu"), ("status", "queued")): 2,
        (("queue", "cpu"), ("status", "running")): 1,
    }  # fmt: skip
    assert got[("mnistq_jobs_finished_total", (("status", "succeeded"),))] == 2
    assert got[("mnistq_jobs_finished_total", (("status", "cancelled"),))] == 1
    assert got[("mnistq_lease_expired_total", ())] == 1
    assert got[("mnistq_job_wait_seconds_count", ())] == 4
    assert got[("mnistq_job_wait_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("mnistq_job_run_seconds_count", ())] == 3  # the running one has not ended
    assert got[("mnistq_job_run_seconds_bucket", (("le", "60.0"),))] == 2
    assert got[("mnistq_job_run_seconds_sum", ())] == pytest.approx(742)
    assert got[("mnistq_queue_oldest_wait_seconds", (("queue", "cpu"),))] == pytest.approx(
        30, abs=5
    )
    assert got[("mnistq_workers", (("state", "live"),))] == 0


def test_webhook_tries_are_counted_by_outcome(
    client: FlaskClient, sessions: sessionmaker[Session], admin: Caller
) -> None:
    with sessions() as session, session.begin():
        session.add(WebhookEndpoint(id="e1", owner_id=admin.id, url="http://x", events=[],
                                    secret="whsec_x"))  # fmt: skip
        session.flush()
        session.add(WebhookDelivery(id="msg_1", endpoint_id="e1", event_type="job.succeeded",
                                    payload={}))  # fmt: skip
        session.flush()
        for number, outcome in enumerate(["failed", "failed", "succeeded"], 1):
            session.add(WebhookAttempt(delivery_id="msg_1", number=number, outcome=outcome))
    got = samples(client.get("/metrics").get_data(as_text=True))
    assert got[("mnistq_webhook_deliveries_total", (("outcome", "failed"),))] == 2
    assert got[("mnistq_webhook_deliveries_total", (("outcome", "succeeded"),))] == 1


def test_requests_are_counted_per_endpoint(client: FlaskClient) -> None:
    for _ in range(3):
        assert client.get("/api/v1/jobs").status_code == 200
    client.get("/api/v1/jobs/" + "0" * 32)
    got = samples(client.get("/metrics").get_data(as_text=True))
    key = (("endpoint", "jobs.index"), ("method", "GET"), ("status", "200"))
    assert got[("mnistq_http_requests_total", key)] == 3
    assert got[("mnistq_http_request_duration_seconds_count", key)] == 3
    missing = (("endpoint", "jobs.get"), ("method", "GET"), ("status", "404"))
    assert got[("mnistq_http_requests_total", missing)] == 1


def test_metrics_need_an_admin_unless_public(
    app: Flask, alice: Caller, anonymous: FlaskClient, tmp_path: Path, database_url: str
) -> None:
    assert anonymous.get("/metrics").status_code == 401
    assert client_as(app, alice).get("/metrics").status_code == 403
    from api import create_app
    from tests.api.conftest import RecordingPublisher

    open_app = create_app(make_settings(tmp_path, database_url, metrics_public=True),
                          publish=RecordingPublisher())  # fmt: skip
    response = open_app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
