"""Submit rate limit per token and queued-job cap per user: 429 JSON with Retry-After."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.db import ENGINE_KEY, SESSIONS_KEY
from shared.config import Settings
from shared.models import Job
from tests.api.conftest import RecordingPublisher, add_user, client_as, make_settings
from tests.api.test_dashboard import csrf_of, signed_in

JOBS = "/api/v1/jobs"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def _app(tmp_path: Path, database_url: str, **overrides: Any) -> Flask:
    return create_app(
        make_settings(tmp_path, database_url, **overrides), publish=RecordingPublisher()
    )


def _jobs(app: Flask) -> int:
    factory: sessionmaker[Session] = app.extensions[SESSIONS_KEY]
    with factory() as session:
        return int(session.scalar(select(func.count(Job.id))) or 0)


def test_submissions_past_the_rate_limit_get_429_with_retry_after(
    tmp_path: Path, database_url: str
) -> None:
    app = _app(tmp_path, database_url, submit_rate_limit="2/minute")
    sessions = app.extensions[SESSIONS_KEY]
    alice = client_as(app, add_user(sessions, "alice"))
    assert [alice.post(JOBS, json={}).status_code for _ in range(2)] == [201, 201]
    refused = alice.post(JOBS, json={})
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "rate_limited"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert _jobs(app) == 2  # the refused request wrote nothing
    # The limit counts per token: another user, and reads, are not affected.
    assert client_as(app, add_user(sessions, "bob")).post(JOBS, json={}).status_code == 201
    assert alice.get(JOBS).status_code == 200
    app.extensions[ENGINE_KEY].dispose()


def test_the_api_and_the_dashboard_form_share_one_budget_per_token(
    tmp_path: Path, database_url: str
) -> None:
    app = _app(tmp_path, database_url, submit_rate_limit="2/minute")
    caller = add_user(app.extensions[SESSIONS_KEY], "alice")
    api = client_as(app, caller)
    form = signed_in(app, caller)
    csrf = csrf_of(form, "/ui/jobs/new")
    assert api.post(JOBS, json={}).status_code == 201
    assert form.post("/ui/jobs/new", data={"csrf_token": csrf}).status_code == 302
    refused = api.post(JOBS, json={})
    assert refused.status_code == 429 and refused.get_json()["error"] == "rate_limited"
    assert form.post("/ui/jobs/new", data={"csrf_token": csrf}).status_code == 429
    assert _jobs(app) == 2
    app.extensions[ENGINE_KEY].dispose()


def test_api_processes_share_the_counter_in_redis(tmp_path: Path, database_url: str) -> None:
    """Two apps (two gunicorn workers) on one Redis: the limit holds across both."""
    first = _app(tmp_path, database_url, submit_rate_limit="2/minute", broker_url=LOCAL_REDIS)
    second = _app(tmp_path, database_url, submit_rate_limit="2/minute", broker_url=LOCAL_REDIS)
    caller = add_user(first.extensions[SESSIONS_KEY], f"u{uuid.uuid4().hex[:12]}")
    codes = [client_as(app, caller).post(JOBS, json={}).status_code for app in (first, second)]
    codes.append(client_as(second, caller).post(JOBS, json={}).status_code)
    assert codes == [201, 201, 429]
    for app in (first, second):
        app.extensions[ENGINE_KEY].dispose()


def test_a_user_with_too_many_queued_jobs_gets_429(tmp_path: Path, database_url: str) -> None:
    app = _app(tmp_path, database_url, max_queued_jobs_per_user=2)
    alice = client_as(app, add_user(app.extensions[SESSIONS_KEY], "alice"))
    first = alice.post(JOBS, json={}, headers={"Idempotency-Key": "k1"}).get_json()["id"]
    assert alice.post(JOBS, json={}).status_code == 201
    refused = alice.post(JOBS, json={})
    assert refused.status_code == 429
    assert refused.get_json()["error"] == "too_many_queued_jobs"
    assert int(refused.headers["Retry-After"]) > 0
    assert _jobs(app) == 2
    # A replay is not a new job, so the cap does not refuse it.
    replay = alice.post(JOBS, json={}, headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 200 and replay.get_json()["id"] == first
    # Cancelling one makes room.
    alice.post(f"{JOBS}/{first}/cancel")
    assert alice.post(JOBS, json={}).status_code == 201
    app.extensions[ENGINE_KEY].dispose()


def test_rate_limit_storage_follows_the_broker() -> None:
    assert Settings(broker_url="filesystem://").ratelimit_storage_uri == "memory://"
    assert Settings(broker_url=LOCAL_REDIS).ratelimit_storage_uri == LOCAL_REDIS


def test_a_bad_rate_limit_setting_fails_at_startup(tmp_path: Path, database_url: str) -> None:
    with pytest.raises(ValueError):
        _app(tmp_path, database_url, submit_rate_limit="lots")
