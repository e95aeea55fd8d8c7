"""Bearer tokens: stored hashed, shown once, required on every route but health and the docs."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from client.cli import cli
from client.server import _bootstrap_admin
from shared.auth import create_token, hash_token, new_token_secret, revoke_token
from shared.config import Settings, get_settings
from shared.models import ApiToken
from tests.api.conftest import Caller, client_as, make_settings

JOBS = "/api/v1/jobs"


def test_health_openapi_and_docs_need_no_token(anonymous: FlaskClient) -> None:
    health = anonymous.get("/api/v1/health")  # 503 here: the test broker has no folder
    assert health.status_code in (200, 503) and health.get_json()["database"]["ok"] is True
    assert anonymous.get("/openapi.json").status_code == 200
    assert anonymous.get("/docs").status_code == 200


@pytest.mark.parametrize(
    "path", [JOBS, f"{JOBS}/{'a' * 32}", f"{JOBS}/{'a' * 32}/metrics", "/api/v1/me"]
)
def test_every_other_route_answers_401_without_a_token(anonymous: FlaskClient, path: str) -> None:
    response = anonymous.get(path)
    assert response.status_code == 401
    assert response.get_json()["error"] == "authentication_required"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="mnistq"'


def test_a_bad_token_is_401_invalid_token(anonymous: FlaskClient) -> None:
    response = anonymous.post(JOBS, json={}, headers={"Authorization": f"Bearer {'x' * 20}"})
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_the_scheme_is_case_insensitive(anonymous: FlaskClient, alice: Caller) -> None:
    response = anonymous.get(JOBS, headers={"Authorization": f"bearer {alice.token}"})
    assert response.status_code == 200


def test_a_revoked_token_stops_working_at_once_without_the_cache(
    tmp_path: Path, database_url: str, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    app = create_app(make_settings(tmp_path, database_url, token_cache_seconds=0),
                     publish=lambda j, q: None)  # fmt: skip
    client = client_as(app, alice)
    assert client.get(JOBS).status_code == 200
    with sessions() as session:
        public_id = session.scalars(select(ApiToken.public_id)).one()
        revoke_token(session, public_id)
    response = client.get(JOBS)
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_token"


def test_a_token_revoked_by_another_process_stops_working_within_the_cache_time(
    tmp_path: Path, database_url: str, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    ttl = 0.5
    app = create_app(make_settings(tmp_path, database_url, token_cache_seconds=ttl),
                     publish=lambda j, q: None)  # fmt: skip
    client = client_as(app, alice)
    assert client.get(JOBS).status_code == 200  # checked once: cached from now on
    with sessions() as session:
        public_id = session.scalars(select(ApiToken.public_id)).one()
    env = {**os.environ, "MNISTQ_DATABASE_URL": database_url, "MNISTQ_VAR_DIR": str(tmp_path)}
    revoke = [sys.executable, "-c", "from client.cli import main; main()",
              "tokens", "revoke", public_id]  # fmt: skip
    subprocess.run(revoke, env=env, check=True, capture_output=True)  # `mnistq tokens revoke`
    revoked = time.monotonic()
    statuses = []
    while time.monotonic() - revoked < ttl + 1.0 and 401 not in statuses:
        statuses.append(client.get(JOBS).status_code)
        time.sleep(0.02)
    # Cached answers may still say 200 for up to ttl seconds, then the row is read again.
    assert statuses[-1] == 401
    assert set(statuses) <= {200, 401}
    assert time.monotonic() - revoked <= ttl + 0.5


def test_tokens_are_stored_only_as_their_sha256(
    alice: Caller, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        [row] = session.scalars(select(ApiToken)).all()
    assert row.token_hash == hash_token(alice.token)
    assert alice.token not in (row.public_id, row.token_hash)
    assert alice.token.startswith("mnq_") and len(alice.token) == 47


def test_tokens_do_not_appear_in_logs(
    anonymous: FlaskClient, alice: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = new_token_secret()
    with caplog.at_level(logging.DEBUG):
        anonymous.get(JOBS, headers={"Authorization": f"Bearer {wrong}"})
        anonymous.get(JOBS, headers=alice.headers)
    assert wrong not in caplog.text and alice.token not in caplog.text


def test_me_and_users(app: Flask, admin: Caller, alice: Caller) -> None:
    me = client_as(app, alice).get("/api/v1/me").get_json()
    assert (me["name"], me["is_admin"], len(me["tokens"])) == ("alice", False, 1)
    assert "token_hash" not in str(me) and alice.token not in str(me)
    forbidden = client_as(app, alice).get("/api/v1/users")
    assert forbidden.status_code == 403
    assert forbidden.get_json()["error"] == "forbidden"
    users = client_as(app, admin).get("/api/v1/users").get_json()["items"]
    assert {u["name"] for u in users} == {"root", "alice"}


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[CliRunner, FlaskClient]]:
    """A CLI runner on a fresh database and an app on the same database."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("MNISTQ_DATABASE_URL", url)
    get_settings.cache_clear()
    settings = Settings(database_url=url, var_dir=tmp_path, token_cache_seconds=0)
    app = create_app(settings, publish=lambda j, q: None)
    yield CliRunner(), app.test_client()
    get_settings.cache_clear()


def test_users_and_tokens_commands(cli_env: tuple[CliRunner, FlaskClient]) -> None:
    runner, client = cli_env
    created = runner.invoke(cli, ["users", "create", "dora"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/me", headers=auth).get_json()["name"] == "dora"
    assert runner.invoke(cli, ["users", "create", "dora"]).exit_code != 0  # name taken
    second = runner.invoke(cli, ["tokens", "create", "dora"]).stdout.strip().splitlines()[-1]
    listed = runner.invoke(cli, ["users", "list"]).stdout
    [line] = [x for x in listed.splitlines() if x.startswith("dora")]
    first_id = line.split("\t")[2].split()[0]
    assert runner.invoke(cli, ["tokens", "revoke", first_id]).exit_code == 0
    assert "(revoked)" in runner.invoke(cli, ["users", "list"]).stdout
    assert client.get("/api/v1/me", headers=auth).status_code == 401
    assert (
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    )
    assert runner.invoke(cli, ["tokens", "revoke", "nope"]).exit_code != 0


def test_first_up_creates_an_admin_and_keeps_its_token_private(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from api import create_app

    settings = Settings(database_url=database_url, var_dir=tmp_path / "var")
    _bootstrap_admin(settings)
    token = capsys.readouterr().out.strip().splitlines()[-1]
    path = settings.admin_token_path
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    app = create_app(settings, publish=lambda j, q: None)
    me = app.test_client().get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.get_json()["is_admin"] is True
    _bootstrap_admin(settings)  # a second start creates nobody and prints no token
    assert token not in capsys.readouterr().out


def test_me_lists_every_token_of_the_user_also_when_the_token_came_from_the_cache(
    tmp_path: Path, database_url: str, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    app = create_app(make_settings(tmp_path, database_url, token_cache_seconds=60),
                     publish=lambda j, q: None)  # fmt: skip
    with sessions() as session:
        create_token(session, "alice")
    client = client_as(app, alice)
    for _ in range(2):  # the token checked in the database, then taken from the cache
        me = client.get("/api/v1/me").get_json()
        assert len(me["tokens"]) == 2, me
