"""Hostile and malformed requests get a clear 4xx JSON error naming the problem, never a 500."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.auth import revoke_token
from shared.models import ApiToken
from shared.store import LocalStore
from tests.api.bombs import scan_bomb
from tests.api.conftest import Caller, add_artifact, add_user, insert_job

JOBS = "/api/v1/jobs"
JOB_ID = "0123456789abcdef0123456789abcdef"  # an existing job, made by the fixture
PREDICT = f"{JOBS}/{JOB_ID}/predict"
# Stand-ins for tokens the fixtures make; any other string is sent as the header itself.
ADMIN, ALICE, REVOKED = "<admin>", "<alice>", "<revoked>"


@dataclass(frozen=True)
class Bad:
    """One bad request and the error it must get."""

    method: str
    path: str
    status: int
    error: str
    body: str | bytes | None = None
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    locs: tuple[tuple[str | int, ...], ...] = ()  # every one must be named in details
    auth: str | None = ADMIN  # the Authorization header; None sends none
    max_bytes: int = 8192  # the error must stay this short, whatever the request's size
    prime: str | None = None  # a page to GET first (it gives the session a CSRF token)


def image(picture: Image.Image, fmt: str = "PNG") -> bytes:
    """``picture`` encoded as ``fmt``."""
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


def post(body: Any, status: int, error: str, *locs: tuple[str | int, ...]) -> Bad:
    """A POST /api/v1/jobs with ``body`` JSON-encoded (or raw when it is a str)."""
    raw = body if isinstance(body, str) else json.dumps(body)
    return Bad("POST", JOBS, status, error, raw, locs=locs)


def auth(header: str | None, error: str = "invalid_token", path: str = JOBS) -> Bad:
    """A GET with this Authorization header (None: without one) that must be refused."""
    return Bad("GET", path, 401, error, auth=header)


HP = ("body", "hyperparameters")
NAME = ("body", "name")
INVALID = "validation_error"
FORM = "application/x-www-form-urlencoded"

CASES: dict[str, Bad] = {
    "no token": auth(None, "authentication_required"),
    "empty authorization": auth("", "authentication_required"),
    "basic auth": auth("Basic dXNlcjpwYXNz"),
    "bearer without token": auth("Bearer"),
    "bearer and spaces": auth("Bearer    "),
    "unknown token": auth("Bearer mnq_" + "A" * 43),
    "token of the wrong shape": auth("Bearer mnq_short"),
    "two tokens": auth("Bearer mnq_" + "A" * 43 + " mnq_" + "B" * 43),
    "token scheme": auth("Token mnq_" + "A" * 43),
    "10 kB token": auth("Bearer " + "x" * 10_000),
    "revoked token": auth(REVOKED),
    "no token on a job": auth(None, "authentication_required", f"{JOBS}/{JOB_ID}/artifacts"),
    "no token, huge body": Bad(
        "POST", JOBS, 401, "authentication_required", "x" * 100_000, auth=None
    ),
    "users list as non-admin": Bad("GET", "/api/v1/users", 403, "forbidden", auth=ALICE),
    "malformed json": post("{", 400, "malformed_json"),
    "empty body": post("", 400, "malformed_json"),
    "trailing garbage": post('{"name": "a"} x', 400, "malformed_json"),
    "invalid utf-8": Bad("POST", JOBS, 400, "malformed_json", b'{"name": "\xff"}'),
    "text/plain": Bad("POST", JOBS, 400, "invalid_content_type", "{}", "text/plain"),
    "no content type": Bad("POST", JOBS, 400, "invalid_content_type", "{}", None),
    "form post": Bad(
        "POST", JOBS, 400, "invalid_content_type", "name=a", "application/x-www-form-urlencoded"
    ),
    "array body": post([], 422, INVALID, ("body",)),
    "string body": post('"x"', 422, INVALID, ("body",)),
    "null body": post(None, 422, INVALID, ("body",)),
    "string for int": post({"hyperparameters": {"n_epochs": "3"}}, 422, INVALID, (*HP, "n_epochs")),
    "bool for int": post({"hyperparameters": {"n_epochs": True}}, 422, INVALID, (*HP, "n_epochs")),
    "float for int": post({"hyperparameters": {"n_epochs": 2.5}}, 422, INVALID, (*HP, "n_epochs")),
    "NaN": post(
        '{"hyperparameters": {"learning_rate": NaN}}', 422, INVALID, (*HP, "learning_rate")
    ),
    "Infinity": post(
        '{"hyperparameters": {"momentum": -Infinity}}', 422, INVALID, (*HP, "momentum")
    ),
    "negative rate": post(
        {"hyperparameters": {"learning_rate": -1}}, 422, INVALID, (*HP, "learning_rate")
    ),
    "huge int": post({"hyperparameters": {"n_epochs": 10**30}}, 422, INVALID, (*HP, "n_epochs")),
    "5000-digit int": post(
        '{"hyperparameters": {"n_epochs": ' + "9" * 5000 + "}}", 400, "malformed_json"
    ),
    "every bad field named": post(
        {"hyperparameters": {"n_epochs": 0, "batch_size_train": -1, "momentum": 1.0}},
        422,
        INVALID,
        (*HP, "n_epochs"),
        (*HP, "batch_size_train"),
        (*HP, "momentum"),
    ),
    "unknown top-level field": post({"epochs": 3}, 422, INVALID, ("body", "epochs")),
    "unknown hyperparameter": post({"hyperparameters": {"lr": 1}}, 422, INVALID, (*HP, "lr")),
    "hyperparameters as array": post({"hyperparameters": [1]}, 422, INVALID, HP),
    "unknown model": post({"hyperparameters": {"model": "vgg"}}, 422, INVALID, (*HP, "model")),
    "name too long": post({"name": "n" * 201}, 422, INVALID, ("body", "name")),
    "name with NUL": post({"name": "a\u0000b"}, 422, INVALID, ("body", "name")),
    "name lone surrogate": post('{"name": "\\ud800"}', 422, INVALID, ("body", "name")),
    "name as object": post({"name": {"a": 1}}, 422, INVALID, ("body", "name")),
    "name with bidi override": post({"name": "invoice\u202etxt.exe"}, 422, INVALID, NAME),
    "name with bidi isolate": post({"name": "a\u2066b\u2069"}, 422, INVALID, NAME),
    "name with zero-width space": post({"name": "ad\u200bmin"}, 422, INVALID, NAME),
    "name with zero-width joiner": post({"name": "a\u200db"}, 422, INVALID, NAME),
    "name with byte order mark": post({"name": "\ufeffname"}, 422, INVALID, NAME),
    "name with line separator": post({"name": "one\u2028two"}, 422, INVALID, NAME),
    "name with paragraph separator": post({"name": "one\u2029two"}, 422, INVALID, NAME),
    "name with escape sequence": post({"name": "\x1b[31mred"}, 422, INVALID, NAME),
    "3000 unknown keys": post(
        {f"k{i:04}": 1 for i in range(3000)}, 422, INVALID, ("body", "k0000"), ("body", "k0019")
    ),
    "3000 unknown hyperparameters": post(
        {"hyperparameters": {f"h{i:04}": 1 for i in range(3000)}}, 422, INVALID, (*HP, "h0000")
    ),
    "one 60 kB unknown key": Bad("POST", JOBS, 422, INVALID, json.dumps({"k" * 60_000: 1})),
    "non-ASCII CSRF header": Bad(
        "POST",
        "/ui/signin",
        400,
        "csrf_failed",
        "token=x",
        FORM,
        headers={"X-CSRF-Token": "\u00e9t\u00e9"},
        auth=None,
        prime="/ui/signin",
    ),
    "non-ASCII CSRF field": Bad(
        "POST",
        "/ui/signin",
        400,
        "csrf_failed",
        "token=x&csrf_token=%C3%A9%E2%9C%93",
        FORM,
        auth=None,
        prime="/ui/signin",
    ),
    "unknown device": post({"device": "tpu"}, 422, INVALID, ("body", "device")),
    "device conflict": post(
        {"device": "cuda", "hyperparameters": {"device": "cpu"}}, 422, INVALID, ("body", "device")
    ),
    "resume job id with dots": post(
        {"resume_from": {"job_id": "../../x"}}, 422, INVALID, ("body", "resume_from", "job_id")
    ),
    "resume epoch bool": post(
        {"resume_from": {"job_id": JOB_ID, "epoch": True}},
        422,
        INVALID,
        ("body", "resume_from", "epoch"),
    ),
    "deeply nested array": post("[" * 30000 + "]" * 30000, 400, "malformed_json"),
    "deeply nested field": post('{"name": ' + "[" * 5000 + "]" * 5000 + "}", 400, "malformed_json"),
    "too large": post({"name": "x" * 70_000}, 413, "payload_too_large"),
    "idempotency key too long": Bad(
        "POST",
        JOBS,
        422,
        INVALID,
        "{}",
        headers={"Idempotency-Key": "k" * 201},
        locs=(("header", "Idempotency-Key"),),
    ),
    "idempotency key with space": Bad(
        "POST",
        JOBS,
        422,
        INVALID,
        "{}",
        headers={"Idempotency-Key": "a b"},
        locs=(("header", "Idempotency-Key"),),
    ),
    "limit zero": Bad("GET", f"{JOBS}?limit=0", 422, INVALID, locs=(("query", "limit"),)),
    "limit not a number": Bad("GET", f"{JOBS}?limit=ten", 422, INVALID, locs=(("query", "limit"),)),
    "unknown status": Bad(
        "GET", f"{JOBS}?status=done", 422, INVALID, locs=(("query", "status", 0),)
    ),
    "forged cursor": Bad(
        "GET", f"{JOBS}?cursor=bm90LWEtY3Vyc29y", 422, INVALID, locs=(("query", "cursor"),)
    ),
    "unknown query parameter": Bad(
        "GET", f"{JOBS}?sort=name", 422, INVALID, locs=(("query", "sort"),)
    ),
    "very long job id": Bad("GET", f"{JOBS}/{'a' * 5000}", 404, "job_not_found"),
    "job id with NUL": Bad("GET", f"{JOBS}/ab%00cd", 404, "job_not_found"),
    "job id with unicode": Bad("GET", f"{JOBS}/%C3%A4%F0%9F%92%A5", 404, "job_not_found"),
    "job id with encoded slash": Bad("GET", f"{JOBS}/..%2F..%2Fetc/cancel", 404, "not_found"),
    "cancel unknown job": Bad("POST", f"{JOBS}/{'9' * 32}/cancel", 404, "job_not_found"),
    "artifact ..": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/..%2F..%2Fetc%2Fpasswd", 400, "invalid_artifact_name"
    ),
    # No route takes a name starting with "/"; merged slashes would redirect as HTML.
    "artifact absolute path": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/%2Fetc%2Fpasswd", 404, "not_found"
    ),
    "artifact double slash": Bad("GET", f"{JOBS}/{JOB_ID}/artifacts//etc/passwd", 404, "not_found"),
    "artifact encoded slash twice": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/a%252Fb", 400, "invalid_artifact_name"
    ),
    "artifact backslash": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/..%5C..%5Cx", 400, "invalid_artifact_name"
    ),
    "artifact NUL": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/model.pth%00.png", 400, "invalid_artifact_name"
    ),
    "artifact too deep": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/a/b/c", 400, "invalid_artifact_name"
    ),
    "artifact symlink escaping": Bad(
        "GET", f"{JOBS}/{JOB_ID}/artifacts/leak.txt", 400, "invalid_artifact_name"
    ),
    "progressive JPEG bomb": Bad(
        "POST", PREDICT, 413, "image_too_large", scan_bomb(1024, size=100_000), "image/jpeg"
    ),
    "PNG header of 30000x30000": Bad(
        "POST", PREDICT, 413, "image_too_large", image(Image.new("1", (30000, 30000))), "image/png"
    ),
    "GIF sent as PNG": Bad(
        "POST",
        PREDICT,
        415,
        "unsupported_image_format",
        image(Image.new("L", (9, 9)), "GIF"),
        "image/png",
    ),
    "unknown route": Bad("GET", "/api/v1/nothing", 404, "not_found"),
    "wrong method": Bad("DELETE", f"{JOBS}/{JOB_ID}", 405, "method_not_allowed"),
    "GET on cancel": Bad("GET", f"{JOBS}/{JOB_ID}/cancel", 405, "method_not_allowed"),
}


@pytest.fixture
def existing_job(sessions: sessionmaker[Session], store: LocalStore, tmp_path: Path) -> str:
    """The job the artifact cases point at, with a recorded artifact that is a symlink out."""
    insert_job(sessions, id=JOB_ID, status="succeeded")
    add_artifact(sessions, store, JOB_ID, "leak.txt", b"placeholder")
    add_artifact(sessions, store, JOB_ID, "model.pth", b"never loaded: the image is refused first")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    link = (store.root / JOB_ID) / "leak.txt"
    link.unlink()
    link.symlink_to(secret)
    return JOB_ID


@pytest.fixture
def tokens(admin: Caller, alice: Caller, sessions: sessionmaker[Session]) -> dict[str, str]:
    """The header values the stand-ins mean: the admin's, alice's and a revoked token."""
    revoked = add_user(sessions, "gone")
    with sessions() as session:
        ids = session.scalars(select(ApiToken.public_id).order_by(ApiToken.id)).all()
        revoke_token(session, ids[-1])
    return {ADMIN: admin.token, ALICE: alice.token, REVOKED: revoked.token}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_request_gets_a_json_error(
    anonymous: FlaskClient, existing_job: str, tokens: dict[str, str], case: Bad
) -> None:
    client = anonymous
    headers = dict(case.headers)
    if case.auth is not None:
        headers["Authorization"] = (
            f"Bearer {tokens[case.auth]}" if case.auth in tokens else case.auth
        )
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    if case.prime is not None:
        assert client.get(case.prime).status_code == 200
    response = client.open(case.path, method=case.method, data=case.body, headers=headers)
    assert response.status_code == case.status, response.get_data(as_text=True)[:500]
    assert len(response.get_data()) <= case.max_bytes
    body = response.get_json()
    assert body["error"] == case.error
    assert isinstance(body["message"], str) and body["message"]
    named = [tuple(d["loc"]) for d in body["details"] or []]
    for loc in case.locs:
        assert loc in named, (loc, named)
        assert ".".join(map(str, loc)) in body["message"]


def test_the_table_covers_enough_cases() -> None:
    assert len(CASES) >= 87  # 71 before the hardening review, 16 rows from it


def test_405_says_which_methods_are_allowed(client: FlaskClient) -> None:
    response = client.delete(JOBS)
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
