"""Health reports which dependency is down; outages are 503s or a stored-but-unpublished job."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from flask import Flask

import shared.db
from api import create_app
from api.auth import public
from api.db import ENGINE_KEY, SESSIONS_KEY
from shared.auth import new_token_secret
from shared.celery_app import make_celery
from shared.migrate import upgrade
from shared.models import JobStatus
from tests.api.conftest import PG_ADMIN, add_user, client_as, insert_job, make_settings

HEALTH = "/api/v1/health"


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _app(tmp_path: Path, database_url: str, **overrides: object) -> Flask:
    return create_app(make_settings(tmp_path, database_url, **overrides))


def test_health_ok_with_the_embedded_broker(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    make_celery(settings)  # creates the broker folders, as the worker and the API do
    app = create_app(settings, publish=lambda job_id, queue: None)
    response = app.test_client().get(HEALTH)
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "database": {"ok": True, "error": None},
        "broker": {"ok": True, "error": None},
    }


def test_health_ok_with_real_redis(tmp_path: Path, database_url: str) -> None:
    app = _app(tmp_path, database_url, broker_url="redis://127.0.0.1:6379/0")
    assert app.test_client().get(HEALTH).status_code == 200


def test_health_names_a_down_broker_quickly(tmp_path: Path, database_url: str) -> None:
    app = _app(tmp_path, database_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    response = app.test_client().get(HEALTH)
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["database"]["ok"] is True
    assert body["broker"]["ok"] is False and body["broker"]["error"]


def test_database_down_is_503_on_health_and_on_routes(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/mnistq"
    app = _app(tmp_path, url, broker_url="redis://127.0.0.1:6379/0")
    client = app.test_client()
    # A well-formed token: checking it needs the database, so the answer is 503, not 401.
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {new_token_secret()}"
    health = client.get(HEALTH)
    assert health.status_code == 503
    assert health.get_json()["database"]["ok"] is False
    assert health.get_json()["broker"]["ok"] is True
    for response in (client.get("/api/v1/jobs"), client.post("/api/v1/jobs", json={})):
        assert response.status_code == 503
        assert response.get_json()["error"] == "database_unavailable"


def test_public_health_says_down_without_naming_hosts_ports_or_roles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db_port, broker_port = free_port(), free_port()
    url = f"postgresql+psycopg://mnistq_role@127.0.0.1:{db_port}/mnistq"
    app = _app(tmp_path, url, broker_url=f"redis://127.0.0.1:{broker_port}/0")
    with caplog.at_level(logging.WARNING, logger="api.health"):
        response = app.test_client().get(HEALTH)
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "database": {"ok": False, "error": "unreachable"},
        "broker": {"ok": False, "error": "unreachable"},
    }
    text = response.get_data(as_text=True)
    for leak in ("127.0.0.1", str(db_port), str(broker_port), "mnistq_role", "psycopg"):
        assert leak not in text, leak
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "api.health")
    assert str(db_port) in logged and str(broker_port) in logged  # the operator still learns why


def test_submit_with_redis_down_still_stores_the_job(tmp_path: Path, database_url: str) -> None:
    """The real Celery publisher against a dead Redis: 201, published_at stays NULL.

    The rate limiter counts in the same dead Redis and falls back to memory meanwhile.
    """
    app = _app(tmp_path, database_url, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    client = client_as(app, add_user(app.extensions[SESSIONS_KEY], "carol"))
    response = client.post("/api/v1/jobs", json={"name": "outbox"})
    assert response.status_code == 201
    job = client.get(response.headers["Location"]).get_json()
    assert job["status"] == "queued"
    assert job["published_at"] is None
    app.extensions[ENGINE_KEY].dispose()


def test_an_unexpected_error_is_logged_and_answered_as_json_500(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/broken", view_func=public(broken))
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        response = app.test_client().get("/broken")
    assert response.status_code == 500
    assert response.get_json()["error"] == "internal_error"
    assert "a bug" not in response.get_data(as_text=True)  # no internals leak to clients
    [record] = [r for r in caplog.records if r.name == "api.errors"]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])


def _drop_connections(database_url: str) -> int:
    """End every server process connected to the database, as a restart of the server does."""
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    return int(ended[0]) if ended else 0


def test_pooled_connections_the_server_dropped_are_replaced(
    tmp_path: Path,
    postgres_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle ones are pinged and replaced unseen; one dropped while busy fails one request."""
    monkeypatch.setattr(shared.db, "PING_AFTER_IDLE_SECONDS", 0.2)
    url = postgres_database()
    upgrade(url)
    app = _app(tmp_path, url)
    client = client_as(app, add_user(app.extensions[SESSIONS_KEY], "ops", admin=True))
    job = f"/api/v1/jobs/{insert_job(app.extensions[SESSIONS_KEY], status=JobStatus.RUNNING)}"
    assert client.get(job).status_code == 200

    assert _drop_connections(url) >= 1
    time.sleep(0.3)  # idle in the pool longer than PING_AFTER_IDLE_SECONDS
    assert [client.get(job).status_code for _ in range(3)] == [200, 200, 200]

    # Dropped while the pool is busy: the request holding it finds out, then the pool
    # replaces every older connection, so only that one request fails.
    assert _drop_connections(url) >= 1
    codes = [client.get(job).status_code for _ in range(3)]
    assert codes[0] in (200, 503) and codes[1:] == [200, 200], codes
    app.extensions[ENGINE_KEY].dispose()
