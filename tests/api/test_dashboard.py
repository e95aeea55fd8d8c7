"""The dashboard: sign-in with a token, CSRF on every form, pages, submit form, cancel."""

from __future__ import annotations

import json
import re
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.dashboard_session import secret_key
from api.db import ENGINE_KEY, SESSIONS_KEY
from shared.auth import revoke_token
from shared.lease import as_utc
from shared.models import ApiToken, DashboardSession, Job, utcnow
from shared.schemas import Hyperparameters
from shared.sessions import hash_session_id
from shared.store import LocalStore
from tests.api.conftest import (
    Caller,
    RecordingPublisher,
    add_artifact,
    add_user,
    insert_job,
    insert_metrics,
    make_settings,
)

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(client: FlaskClient, path: str = "/ui/signin") -> str:
    """The CSRF token a page of the dashboard hands out."""
    found = CSRF.search(client.get(path).get_data(as_text=True))
    assert found is not None
    return found.group(1)


def signed_in(app: Flask, caller: Caller) -> FlaskClient:
    """A browser-like client (no Authorization header) signed in with ``caller``'s token."""
    client = app.test_client()
    response = client.post(
        "/ui/signin", data={"token": caller.token, "csrf_token": csrf_of(client)}
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return client


@pytest.fixture
def browser(app: Flask, admin: Caller) -> FlaskClient:
    """The admin, signed in to the dashboard."""
    return signed_in(app, admin)


def test_root_redirects_to_the_dashboard_and_pages_need_a_session(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/").headers["Location"].endswith("/ui/")
    response = client.get("/ui/draw?job=x")
    assert response.status_code == 302
    assert response.headers["Location"] == "/ui/signin?next=/ui/draw?job%3Dx"


def test_sign_in_with_a_good_token_sets_a_locked_down_cookie(app: Flask, admin: Caller) -> None:
    client = app.test_client()
    token = csrf_of(client)
    response = client.post(
        "/ui/signin?next=/ui/draw", data={"token": admin.token, "csrf_token": token}
    )
    assert response.status_code == 302 and response.headers["Location"] == "/ui/draw"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert admin.token not in cookie  # the secret never travels in the cookie
    page = client.get("/ui/")
    assert page.status_code == 200 and "root (admin)" in page.get_data(as_text=True)


def test_sign_in_with_a_bad_token_is_refused(app: Flask) -> None:
    client = app.test_client()
    bad = "mnq_" + "x" * 43
    response = client.post("/ui/signin", data={"token": bad, "csrf_token": csrf_of(client)})
    assert "unknown or revoked" in response.get_data(as_text=True)
    assert client.get("/ui/").status_code == 302


# Hostile sign-in targets (URL-encoded as sent): each must land on the dashboard, never off
# site and never as a 500. Browsers drop tabs and newlines, so "/\t/evil" is "//evil".
OFF_SITE_NEXT = {
    "protocol-relative": "//evil.example/x",
    "tab then slash": "/%09/evil.example",
    "newline then slash": "/%0A/evil.example",
    "CR then slash": "/%0D/evil.example",
    "header injection": "/%0D%0ASet-Cookie:%20a=b",
    "backslash": "/%5Cevil.example",
    "slash backslash": "%5C%5Cevil.example",
    "absolute URL": "https://evil.example/",
    "scheme only": "javascript:alert(1)",
    "leading space": "%20//evil.example",
    "NUL": "/ui/%00",
}


@pytest.mark.parametrize("target", OFF_SITE_NEXT.values(), ids=OFF_SITE_NEXT.keys())
def test_sign_in_never_redirects_off_site(app: Flask, admin: Caller, target: str) -> None:
    client = app.test_client()
    data = {"token": admin.token, "csrf_token": csrf_of(client)}
    response = client.post(f"/ui/signin?next={target}", data=data)
    assert response.status_code == 302
    assert response.headers["Location"] == "/ui/"


def test_sign_in_keeps_a_local_target_with_its_query(app: Flask, admin: Caller) -> None:
    client = app.test_client()
    data = {"token": admin.token, "csrf_token": csrf_of(client)}
    response = client.post("/ui/signin?next=/ui/compare%3Fjob%3Da%26job%3Db", data=data)
    assert response.headers["Location"] == "/ui/compare?job=a&job=b"


@pytest.mark.parametrize("sent", [None, "forged"])
def test_a_post_without_the_csrf_token_is_refused(
    app: Flask, admin: Caller, sent: str | None
) -> None:
    client = app.test_client()
    csrf_of(client)  # the session has a token; the post does not carry it
    data = {"token": admin.token} | ({"csrf_token": sent} if sent else {})
    response = client.post("/ui/signin", data=data)
    assert response.status_code == 400
    assert response.get_json()["error"] == "csrf_failed"
    assert client.get("/ui/").status_code == 302  # not signed in


def test_forms_of_a_signed_in_session_need_the_csrf_token(
    browser: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="running")
    assert browser.post(f"/ui/jobs/{job_id}/cancel").status_code == 400
    assert browser.post("/ui/jobs/new", data={"n_epochs": "1"}).status_code == 400
    assert browser.post("/ui/signout").status_code == 400
    with sessions() as session:
        assert session.get(Job, job_id).cancel_requested is False  # type: ignore[union-attr]


def test_sign_out_ends_the_session(browser: FlaskClient) -> None:
    response = browser.post("/ui/signout", data={"csrf_token": csrf_of(browser, "/ui/")})
    assert response.status_code == 302
    assert browser.get("/ui/").status_code == 302


def test_a_revoked_token_ends_its_sessions(
    app: Flask, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    client = signed_in(app, alice)
    assert client.get("/ui/").status_code == 200
    with sessions() as session:
        token = session.scalars(select(ApiToken).where(ApiToken.user_id == alice.id)).one()
        revoke_token(session, token.public_id)
    assert client.get("/ui/").status_code == 302
    assert client.get("/api/v1/jobs").status_code == 401


def test_pages_render_with_the_strict_policy(
    browser: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    job_id = insert_job(sessions, name="done", status="succeeded", test_accuracy=0.95)
    add_artifact(sessions, store, job_id, "loss_curve.png", b"\x89PNG")
    add_artifact(sessions, store, job_id, "model.pth", b"weights")
    pages = ["/ui/", "/ui/jobs/new", f"/ui/jobs/{job_id}", f"/ui/compare?job={job_id}", "/ui/draw"]
    for path in pages:
        response = browser.get(path)
        assert response.status_code == 200, path
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, path
        html = response.get_data(as_text=True)
        assert not re.search(r"<script>|<script [^>]*>[^<]", html), path  # no inline code
        assert not re.search(r"(src|href)=\"https?://", html), path  # nothing from elsewhere
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    job_page = browser.get(f"/ui/jobs/{job_id}").get_data(as_text=True)
    assert f"/api/v1/jobs/{job_id}/artifacts/loss_curve.png" in job_page
    assert f'href="/api/v1/jobs/{job_id}/artifacts/model.pth" download' in job_page
    assert "95.00%" in browser.get("/ui/").get_data(as_text=True)


def test_the_session_reads_the_json_api_but_cannot_post_to_it(
    browser: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="running")
    insert_metrics(
        sessions, job_id, [{"kind": "train", "epoch": 1, "step": 10, "samples_seen": 640,
                            "loss": 1.5, "seconds": 1.0}],
    )  # fmt: skip
    assert browser.get("/api/v1/jobs").get_json()["items"][0]["id"] == job_id
    assert browser.get(f"/api/v1/jobs/{job_id}/metrics").get_json()["train"][0]["loss"] == 1.5
    cross_site = browser.get("/api/v1/jobs", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 401
    assert browser.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 401
    assert browser.post("/api/v1/jobs", json={}).status_code == 401


def test_static_files_need_no_session(app: Flask) -> None:
    response = app.test_client().get("/static/dashboard/common.js")
    assert response.status_code == 200 and "drawChart" in response.get_data(as_text=True)


def test_the_form_shows_every_hyperparameter_with_default_and_bounds(
    browser: FlaskClient,
) -> None:
    html = browser.get("/ui/jobs/new").get_data(as_text=True)
    for name, field in Hyperparameters.model_fields.items():
        assert f'name="{name}"' in html, name
        assert f"default <code>{field.default}</code>" in html, name
    assert "<code>1 ≤ x ≤ 100</code>" in html  # n_epochs
    assert "<code>0 &lt; x ≤ 10</code>" in html  # learning_rate: exclusive lower bound
    assert '<option value="adamw"' in html


def submit(browser: FlaskClient, **fields: str) -> tuple[int, str, str]:
    """Post the submit form; (status, Location, page)."""
    data = {"csrf_token": csrf_of(browser, "/ui/jobs/new")} | fields
    response = browser.post("/ui/jobs/new", data=data)
    return (
        response.status_code,
        response.headers.get("Location", ""),
        response.get_data(as_text=True),
    )


def test_submit_form_errors_are_shown_next_to_their_fields(
    browser: FlaskClient, publisher: RecordingPublisher
) -> None:
    status, _, html = submit(
        browser, n_epochs="0", learning_rate="fast", momentum="1", batch_size_train="64"
    )
    assert status == 200
    assert re.search(r'id="error-n_epochs">[^<]*greater than or equal to 1', html)
    assert 'id="error-learning_rate">must be a number' in html
    assert re.search(r'id="error-momentum">[^<]*less than 1', html)
    assert 'id="error-batch_size_train"' not in html
    assert 'value="fast"' in html  # what was typed stays in the form
    assert publisher.calls == []


def test_a_valid_submission_stores_publishes_and_opens_the_job(
    browser: FlaskClient, publisher: RecordingPublisher, sessions: sessionmaker[Session]
) -> None:
    status, location, _ = submit(browser, name="from the form", n_epochs="2", optimizer="adam")
    assert status == 302
    job_id = location.rsplit("/", 1)[1]
    assert publisher.calls == [(job_id, "cpu")]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.name == "from the form"
        assert job.hyperparameters["n_epochs"] == 2 and job.hyperparameters["optimizer"] == "adam"
        assert job.hyperparameters["batch_size_train"] == 64  # empty: the default
    page = browser.get(location).get_data(as_text=True)
    assert f"Job {job_id} submitted." in page and "Cancel job" in page


def test_cancel_from_the_job_page(browser: FlaskClient, sessions: sessionmaker[Session]) -> None:
    job_id = insert_job(sessions, status="queued")
    token = csrf_of(browser, f"/ui/jobs/{job_id}")
    response = browser.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert response.status_code == 302
    with sessions() as session:
        assert session.get(Job, job_id).status == "cancelled"  # type: ignore[union-attr]
    again = browser.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token})
    page = browser.get(again.headers["Location"]).get_data(as_text=True)
    assert 'class="flash error"' in page  # a finished job cannot be cancelled


def test_users_see_only_their_own_jobs(
    app: Flask, alice: Caller, bob: Caller, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="queued", owner_id=bob.id)
    client = signed_in(app, alice)
    assert client.get(f"/ui/jobs/{job_id}").status_code == 404
    assert job_id not in client.get("/ui/").get_data(as_text=True)
    assert client.get(f"/ui/compare?job={job_id}").status_code == 404


def test_predict_needs_csrf_and_a_png(
    browser: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="succeeded")
    url = f"/ui/jobs/{job_id}/predict"
    png = {"Content-Type": "image/png"}
    assert browser.post(url, data=b"\x89PNG", headers=png).status_code == 400
    token = csrf_of(browser, "/ui/draw")
    wrong = browser.post(
        url, data=b"x", headers={"X-CSRF-Token": token, "Content-Type": "text/plain"}
    )
    assert wrong.status_code == 415


def test_the_secret_key_is_made_once_and_kept_private(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url)
    first = secret_key(settings)
    assert len(first) >= 32 and secret_key(settings) == first
    assert stat.S_IMODE(settings.secret_key_path.stat().st_mode) == 0o600
    app = create_app(settings, publish=lambda j, q: None)
    assert app.secret_key == first
    key = "k" * 32
    configured = make_settings(tmp_path, database_url, secret_key=SecretStr(key))
    assert secret_key(configured) == key


@pytest.mark.parametrize("key", ["change-me", "", "x" * 31])
def test_a_short_configured_key_is_refused(tmp_path: Path, database_url: str, key: str) -> None:
    with pytest.raises(ValidationError, match="secret_key"):
        make_settings(tmp_path, database_url, secret_key=SecretStr(key))


def cookie_of(client: FlaskClient, app: Flask) -> dict[str, Any]:
    """The signed session cookie's content, read with the app's own key."""
    cookie = client.get_cookie("mnistq_session")
    assert cookie is not None
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    content: dict[str, Any] = serializer.loads(cookie.value)
    return content


def session_rows(sessions: sessionmaker[Session]) -> list[DashboardSession]:
    """Every dashboard session in the database."""
    with sessions() as session:
        return list(session.scalars(select(DashboardSession)))


def test_sign_out_ends_the_session_for_a_copied_cookie_too(app: Flask, admin: Caller) -> None:
    browser = signed_in(app, admin)
    thief = app.test_client()
    cookie = browser.get_cookie("mnistq_session")
    assert cookie is not None
    thief.set_cookie("mnistq_session", cookie.value)
    assert thief.get("/ui/").status_code == 200
    browser.post("/ui/signout", data={"csrf_token": csrf_of(browser, "/ui/")})
    assert thief.get("/ui/").status_code == 302
    assert thief.get("/api/v1/jobs").status_code == 401  # the JSON API's session reads too


def test_the_cookie_holds_a_random_id_and_the_database_only_its_hash(
    app: Flask, admin: Caller, sessions: sessionmaker[Session]
) -> None:
    first, second = signed_in(app, admin), signed_in(app, admin)
    ids = [cookie_of(client, app)["sid"] for client in (first, second)]
    assert ids[0] != ids[1] and min(map(len, ids)) >= 40
    rows = session_rows(sessions)
    assert {row.id_hash for row in rows} == {hash_session_id(i) for i in ids}
    with sessions() as session:
        token_hash = session.scalars(select(ApiToken.token_hash)).one()
    for client in (first, second):
        assert token_hash not in json.dumps(cookie_of(client, app))


@pytest.mark.parametrize("field", ["token_hash", "sid"])
def test_a_cookie_forged_from_the_database_and_the_key_gets_nowhere(
    app: Flask, admin: Caller, sessions: sessionmaker[Session], field: str
) -> None:
    """Whoever reads the database (or a backup) and knows the key still cannot sign in."""
    signed_in(app, admin)  # a live session whose row the forger can read
    with sessions() as session:
        known = {
            "token_hash": session.scalars(select(ApiToken.token_hash)).one(),
            "sid": session.scalars(select(DashboardSession.id_hash)).one(),
        }
    forger = app.test_client()
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    forger.set_cookie("mnistq_session", serializer.dumps({field: known[field]}))
    assert forger.get("/ui/").status_code == 302
    assert forger.get("/api/v1/jobs").status_code == 401


def test_a_session_idle_past_its_lifetime_ends(
    app: Flask, admin: Caller, sessions: sessionmaker[Session]
) -> None:
    assert app.config["PERMANENT_SESSION_LIFETIME"] == timedelta(hours=12)
    browser = signed_in(app, admin)
    with sessions() as session, session.begin():
        session.execute(
            update(DashboardSession).values(last_seen_at=utcnow() - timedelta(hours=11))
        )
    assert browser.get("/ui/").status_code == 200  # used within 12 h: alive, and seen again
    [row] = session_rows(sessions)
    assert utcnow() - as_utc(row.last_seen_at) < timedelta(minutes=1)
    with sessions() as session, session.begin():
        session.execute(
            update(DashboardSession).values(last_seen_at=utcnow() - timedelta(hours=12, seconds=1))
        )
    assert browser.get("/ui/").status_code == 302
    assert session_rows(sessions) == []


def test_revoking_the_token_deletes_its_sessions(
    app: Flask, alice: Caller, bob: Caller, sessions: sessionmaker[Session]
) -> None:
    signed_in(app, alice)
    signed_in(app, bob)
    with sessions() as session:
        token = session.scalars(select(ApiToken).where(ApiToken.user_id == alice.id)).one()
        revoke_token(session, token.public_id)
        assert {row.token.user_id for row in session.scalars(select(DashboardSession))} == {bob.id}


def test_the_secure_flag_is_a_setting(tmp_path: Path, database_url: str) -> None:
    for secure in (False, True):
        settings = make_settings(tmp_path, database_url, session_cookie_secure=secure)
        app = create_app(settings, publish=RecordingPublisher())
        caller = add_user(app.extensions[SESSIONS_KEY], f"u{int(secure)}")
        client = app.test_client()
        data = {"token": caller.token, "csrf_token": csrf_of(client)}
        cookie = client.post("/ui/signin", data=data).headers["Set-Cookie"]
        assert ("Secure" in cookie.split("; ")) is secure, cookie
        app.extensions[ENGINE_KEY].dispose()
