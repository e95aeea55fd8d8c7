"""Webhook endpoints over HTTP, the outbox written with the state change, the retry machine."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared import webhooks
from shared.config import Settings
from shared.jobs import request_cancel
from shared.lease import as_utc
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from shared.webhooks import Try
from tests.api.conftest import Caller, client_as, insert_job, make_settings
from tests.webhook_receiver import Receiver, receiving, trickling
from worker.webhooks import ERROR_BYTES, post, retry_after_of, send

SUBSCRIBED = ["job.succeeded", "job.failed", "job.cancelled"]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Endpoints on this machine are allowed, as the tests' receivers listen on loopback."""
    return make_settings(tmp_path, database_url, webhook_allow_private=True)


def create(client: FlaskClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                                     "events": SUBSCRIBED, **body})  # fmt: skip
    assert response.status_code == 201, response.get_json()
    return dict(response.get_json())


def test_an_endpoint_shows_its_secret_once_and_is_its_owners_only(
    app: Flask, alice: Caller, bob: Caller
) -> None:
    as_alice, as_bob = client_as(app, alice), client_as(app, bob)
    made = create(as_alice, description="ci")
    assert made["secret"].startswith("whsec_") and made["events"] == sorted(SUBSCRIBED)
    Webhook(made["secret"])  # a secret the Standard Webhooks library accepts
    shown = as_alice.get(f"/api/v1/webhooks/{made['id']}").get_json()
    assert "secret" not in shown and shown["url"] == "http://127.0.0.1:9/hook"
    assert [e["id"] for e in as_alice.get("/api/v1/webhooks").get_json()["items"]] == [made["id"]]
    assert as_bob.get("/api/v1/webhooks").get_json()["items"] == []
    for method, path in [("get", ""), ("delete", ""), ("post", "/test"), ("get", "/deliveries")]:
        response = getattr(as_bob, method)(f"/api/v1/webhooks/{made['id']}{path}")
        assert response.status_code == 404, (method, path)
    assert as_alice.delete(f"/api/v1/webhooks/{made['id']}").status_code == 204
    assert as_alice.get(f"/api/v1/webhooks/{made['id']}").status_code == 404


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"url": "ftp://example.com/x", "events": ["job.failed"]}, ["body", "url"]),
        ({"url": "http://127.0.0.1:9/x", "events": ["job.exploded"]}, ["body", "events", 0]),
        ({"url": "http://127.0.0.1:9/x", "events": []}, ["body", "events"]),
        ({"url": "http://127.0.0.1:9/x", "events": ["job.failed"], "x": 1}, ["body", "x"]),
    ],
)
def test_bad_endpoints_are_422_naming_the_field(
    client: FlaskClient, body: dict[str, Any], loc: list[Any]
) -> None:
    response = client.post("/api/v1/webhooks", json=body)
    assert response.status_code == 422
    assert response.get_json()["details"][0]["loc"] == loc


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/x", "http://localhost/x", "http://10.1.2.3/x",
            "http://169.254.169.254/latest", "http://[::1]/x", "http://192.168.0.1/x"],
)  # fmt: skip
def test_internal_addresses_are_refused_unless_allowed(
    tmp_path: Path, database_url: str, admin: Caller, url: str
) -> None:
    from api import create_app
    from tests.api.conftest import RecordingPublisher

    strict = create_app(make_settings(tmp_path, database_url), publish=RecordingPublisher())
    response = client_as(strict, admin).post(
        "/api/v1/webhooks", json={"url": url, "events": ["job.failed"]}
    )
    assert response.status_code == 422
    assert response.get_json()["details"][0]["loc"] == ["body", "url"]
    assert "MNISTQ_WEBHOOK_ALLOW_PRIVATE" in response.get_json()["details"][0]["msg"]


def test_a_cancel_writes_the_event_for_the_owners_subscribed_endpoints_only(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, bob: Caller
) -> None:
    mine = create(client_as(app, alice))
    create(client_as(app, alice), events=["job.succeeded"])  # not subscribed to cancels
    create(client_as(app, bob))  # another user's
    job_id = insert_job(sessions, owner_id=alice.id, name="to cancel")
    with sessions() as session:
        request_cancel(session, job_id, owner_id=alice.id)
    with sessions() as session:
        rows = session.scalars(select(WebhookDelivery)).all()
    assert [(r.endpoint_id, r.event_type) for r in rows] == [(mine["id"], "job.cancelled")]
    payload = rows[0].payload
    assert payload["type"] == "job.cancelled" and payload["data"]["id"] == job_id
    assert payload["data"]["status"] == "cancelled" and payload["data"]["name"] == "to cancel"
    listed = client_as(app, alice).get(f"/api/v1/webhooks/{mine['id']}/deliveries").get_json()
    assert [(d["status"], d["attempts"], d["tries"]) for d in listed["items"]] == [
        ("pending", 0, [])
    ]


def taken_one(sessions: sessionmaker[Session]) -> webhooks.Taken:
    due = webhooks.take_due(sessions)
    assert len(due) == 1
    return due[0]


def make_delivery(app: Flask, caller: Caller) -> str:
    endpoint = create(client_as(app, caller))
    response = client_as(app, caller).post(f"/api/v1/webhooks/{endpoint['id']}/test")
    assert response.status_code == 202
    return str(response.get_json()["id"])


def test_failed_tries_back_off_honour_retry_after_and_give_up(
    app: Flask, sessions: sessionmaker[Session], alice: Caller
) -> None:
    delivery_id = make_delivery(app, alice)
    delays = (10.0, 20.0)
    first = taken_one(sessions)
    assert webhooks.take_due(sessions) == []  # leased: another sender skips it
    assert webhooks.record_try(sessions, first, Try("failed", status_code=500), delays)
    assert not webhooks.record_try(sessions, first, Try("succeeded"), delays)  # fenced: used
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.status == "pending" and row.attempts == 1
        wait = as_utc(row.next_attempt_at) - utcnow()
        assert timedelta(seconds=8) < wait <= timedelta(seconds=10)
        row.next_attempt_at = utcnow()
        session.commit()
    second = taken_one(sessions)
    late = Try("failed", status_code=503, retry_after=timedelta(seconds=120))
    assert webhooks.record_try(sessions, second, late, delays)
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        wait = as_utc(row.next_attempt_at) - utcnow()
        assert timedelta(seconds=110) < wait <= timedelta(seconds=120)
        row.next_attempt_at = utcnow()
        session.commit()
    assert webhooks.record_try(
        sessions, taken_one(sessions), Try("failed", status_code=500), delays
    )
    with sessions() as session:
        row = session.get(WebhookDelivery, delivery_id)
        tries = session.scalars(select(WebhookAttempt.outcome).order_by(WebhookAttempt.number))
        assert row is not None and (row.status, row.attempts) == ("failed", 3)
        assert list(tries) == ["failed", "failed", "failed"]
    assert webhooks.take_due(sessions) == []


def test_a_410_disables_the_endpoint(
    app: Flask, sessions: sessionmaker[Session], alice: Caller
) -> None:
    make_delivery(app, alice)
    assert webhooks.record_try(sessions, taken_one(sessions), Try("gone", status_code=410), (1,))
    with sessions() as session:
        endpoint = session.scalars(select(WebhookEndpoint)).one()
        assert endpoint.disabled_at is not None and "410" in (endpoint.disabled_reason or "")
        assert webhooks.enqueue_event(session, alice.id, "job.failed", {}) == []


@pytest.mark.parametrize(("value", "seconds"), [("120", 120), (None, None), ("soon", None)])
def test_retry_after_reads_seconds(value: str | None, seconds: int | None) -> None:
    wait = retry_after_of(value)
    assert (wait.total_seconds() if wait else None) == seconds


@pytest.fixture
def receiver() -> Iterator[str]:
    with receiving(default_status=204) as url:
        yield url


def test_a_post_is_signed_as_standard_webhooks_verify(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, receiver: str, settings: Settings
) -> None:
    endpoint = create(client_as(app, alice), url=receiver)
    client_as(app, alice).post(f"/api/v1/webhooks/{endpoint['id']}/test")
    taken = taken_one(sessions)
    result = post(taken, settings)
    assert (result.outcome, result.status_code) == ("succeeded", 204)
    [(headers, body)] = Receiver.got
    assert headers["webhook-id"] == taken.id and headers["content-type"] == "application/json"
    message = Webhook(endpoint["secret"]).verify(body, headers)
    assert message["type"] == "webhook.test" and message == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(body, headers)


@pytest.mark.parametrize("status", [500, 200])
def test_a_huge_answer_is_not_read_past_its_first_bytes(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, settings: Settings, status: int
) -> None:
    huge = 2 << 30  # 2 GiB: read whole, it would take the sender's memory and many seconds
    with receiving(default_status=status, body_bytes=huge) as url:
        endpoint = create(client_as(app, alice), url=url)
        client_as(app, alice).post(f"/api/v1/webhooks/{endpoint['id']}/test")
        started = time.monotonic()
        result = post(taken_one(sessions), settings)
        took = time.monotonic() - started
        deadline = time.monotonic() + 5
        while not Receiver.sent and time.monotonic() < deadline:
            time.sleep(0.01)  # the receiver sees the hang-up at its next write
    assert result.status_code == status and took < settings.webhook_timeout_seconds
    if status == 500:
        assert result.outcome == "failed" and result.error == "x" * ERROR_BYTES
    else:
        assert result.outcome == "succeeded"
    [sent] = Receiver.sent
    assert sent < huge  # the sender hung up instead of taking it all


def test_a_trickled_answer_is_cut_off_at_the_posts_deadline(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, settings: Settings
) -> None:
    quick = settings.model_copy(update={"webhook_timeout_seconds": 1.0})
    with trickling(byte_every=0.2) as url:  # each byte well within a per-read timeout
        endpoint = create(client_as(app, alice), url=url)
        client_as(app, alice).post(f"/api/v1/webhooks/{endpoint['id']}/test")
        started = time.monotonic()
        result = post(taken_one(sessions), quick)
        took = time.monotonic() - started
    assert result.outcome == "failed" and "no whole answer within 1 s" in (result.error or "")
    assert 0.9 < took < 3


def test_a_post_goes_to_the_checked_address_under_its_own_name(receiver: str) -> None:
    port = receiver.split(":")[2].split("/")[0]
    # The name resolves nowhere: only the address the check passed can be reached.
    url = f"http://hooks.example.invalid:{port}/hook?x=1"
    answer = send(url, "127.0.0.1", b"{}", {"content-type": "application/json"}, 5)
    assert answer.status == 204
    [(headers, body)] = Receiver.got
    assert headers["host"] == f"hooks.example.invalid:{port}" and body == b"{}"


def test_a_post_over_tls_verifies_the_receivers_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with receiving(tls=tls) as url:
        # Under the certificate's own name, at the receiver's address.
        named = url.replace("127.0.0.1", "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):
            send(named, "127.0.0.1", b"{}", {}, 5)  # self-signed: no certificate we trust
    assert Receiver.got == []


def test_a_post_to_loopback_is_refused_when_private_addresses_are_not_allowed(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, receiver: str, settings: Settings
) -> None:
    endpoint = create(client_as(app, alice), url=receiver)
    client_as(app, alice).post(f"/api/v1/webhooks/{endpoint['id']}/test")
    strict = settings.model_copy(update={"webhook_allow_private": False})
    result = post(taken_one(sessions), strict)
    assert result.outcome == "refused" and "127.0.0.1" in (result.error or "")
    assert Receiver.got == []
