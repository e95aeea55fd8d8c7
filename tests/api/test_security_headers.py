"""Browser-facing safety: nosniff everywhere, a strict CSP on pages, CORS only when configured."""

from __future__ import annotations

import re
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from shared.store import LocalStore
from tests.api.conftest import add_artifact, insert_job, make_settings

JOBS = "/api/v1/jobs"
ORIGIN = "https://dash.example.org"


def test_every_response_says_nosniff(
    client: FlaskClient,
    anonymous: FlaskClient,
    sessions: sessionmaker[Session],
    store: LocalStore,
) -> None:
    job_id = insert_job(sessions, status="succeeded")
    add_artifact(sessions, store, job_id, "examples.png", b"\x89PNG")
    responses = [
        client.get(JOBS),
        client.get(f"{JOBS}/{job_id}/artifacts/examples.png"),
        client.get(f"{JOBS}/nope"),
        anonymous.get(JOBS),
        anonymous.get("/openapi.json"),
        anonymous.get("/docs"),
    ]
    for response in responses:
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
    download = responses[1]
    assert "sandbox" in download.headers["Content-Security-Policy"]


def test_the_docs_page_is_self_contained_and_locked_down(anonymous: FlaskClient) -> None:
    response = anonymous.get("/docs")
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["Referrer-Policy"] == "no-referrer"
    html = response.get_data(as_text=True)
    assert "<script" not in html
    assert not re.search(r"(src|href)=\"https?://", html)  # nothing fetched from elsewhere
    doc = anonymous.get("/openapi.json").get_json()
    for path, ops in doc["paths"].items():  # every operation is on the page
        assert f"<code>{path}</code>" in html
        for op in ops.values():
            assert f'id="{op["operationId"]}"' in html
    assert 'id="schema-JobCreate"' in html


def test_cors_is_off_by_default(anonymous: FlaskClient) -> None:
    preflight = anonymous.options(
        JOBS, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers
    response = anonymous.get("/openapi.json", headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_answers_configured_origins_only(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, cors_origins=f"{ORIGIN}, https://b.example")
    client = create_app(settings, publish=lambda j, q: None).test_client()
    preflight = client.options(
        JOBS,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert preflight.status_code == 200  # no token needed for a preflight
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    other = client.options(
        JOBS, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers
    unauthorized = client.get(JOBS, headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["Access-Control-Allow-Origin"] == ORIGIN
