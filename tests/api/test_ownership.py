"""A job belongs to its creator: other users cannot see or touch it; admins see every job."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from shared.store import LocalStore
from tests.api.conftest import Caller, add_artifact, client_as, insert_job

JOBS = "/api/v1/jobs"


@pytest.fixture
def alices_job(
    app: Flask, alice: Caller, sessions: sessionmaker[Session], store: LocalStore
) -> str:
    """A job alice submitted, with a checkpoint and a model file."""
    job = client_as(app, alice).post(JOBS, json={"hyperparameters": {"n_epochs": 2}}).get_json()
    add_artifact(sessions, store, job["id"], "checkpoints/epoch-1.pt", b"ckpt")
    add_artifact(sessions, store, job["id"], "model.pth", b"model")
    return str(job["id"])


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/metrics"),
        ("GET", "/artifacts"),
        ("GET", "/artifacts/model.pth"),
        ("POST", "/cancel"),
    ],
)
def test_another_user_gets_404_for_every_route_of_the_job(
    app: Flask, bob: Caller, alices_job: str, method: str, suffix: str
) -> None:
    response = client_as(app, bob).open(f"{JOBS}/{alices_job}{suffix}", method=method)
    assert response.status_code == 404
    assert response.get_json()["error"] == "job_not_found"


def test_lists_show_only_ones_own_jobs_but_admins_see_all(
    app: Flask, alice: Caller, bob: Caller, admin: Caller, alices_job: str
) -> None:
    bobs = client_as(app, bob).post(JOBS, json={}).get_json()["id"]

    def listed(caller: Caller) -> set[str]:
        return {j["id"] for j in client_as(app, caller).get(JOBS).get_json()["items"]}

    assert listed(alice) == {alices_job}
    assert listed(bob) == {bobs}
    assert listed(admin) == {alices_job, bobs}


def test_the_owner_and_an_admin_can_read_and_cancel(
    app: Flask, alice: Caller, admin: Caller, alices_job: str
) -> None:
    assert client_as(app, alice).get(f"{JOBS}/{alices_job}/artifacts/model.pth").data == b"model"
    assert client_as(app, admin).get(f"{JOBS}/{alices_job}").status_code == 200
    response = client_as(app, admin).post(f"{JOBS}/{alices_job}/cancel")
    assert response.status_code == 202 and response.get_json()["status"] == "cancelled"


def test_jobs_from_before_authentication_are_only_for_admins(
    app: Flask, alice: Caller, admin: Caller, sessions: sessionmaker[Session]
) -> None:
    legacy = insert_job(sessions, status="succeeded")
    assert client_as(app, alice).get(f"{JOBS}/{legacy}").status_code == 404
    assert client_as(app, admin).get(f"{JOBS}/{legacy}").status_code == 200


def test_resuming_from_another_users_job_reads_as_a_missing_job(
    app: Flask, bob: Caller, alices_job: str
) -> None:
    body = {"resume_from": {"job_id": alices_job}, "hyperparameters": {"n_epochs": 3}}
    response = client_as(app, bob).post(JOBS, json=body)
    assert response.status_code == 422
    [detail] = response.get_json()["details"]
    assert detail["loc"] == ["body", "resume_from", "job_id"]
    assert detail["msg"] == "no job with this id"


def test_the_owner_resumes_from_their_own_job(app: Flask, alice: Caller, alices_job: str) -> None:
    body = {"resume_from": {"job_id": alices_job}, "hyperparameters": {"n_epochs": 3}}
    response = client_as(app, alice).post(JOBS, json=body)
    assert response.status_code == 201
    assert response.get_json()["resume_from"] == {"job_id": alices_job, "epoch": 1}


def test_resume_with_another_optimizer_is_422_at_submit(
    app: Flask, alice: Caller, alices_job: str
) -> None:
    hp: dict[str, Any] = {"n_epochs": 3, "optimizer": "adam"}
    body = {"resume_from": {"job_id": alices_job}, "hyperparameters": hp}
    response = client_as(app, alice).post(JOBS, json=body)
    assert response.status_code == 422
    [detail] = response.get_json()["details"]
    assert detail["loc"] == ["body", "hyperparameters", "optimizer"]
    assert "'sgd'" in detail["msg"]


def test_idempotency_keys_are_per_user(app: Flask, alice: Caller, bob: Caller) -> None:
    key = {"Idempotency-Key": "same-key"}
    a = client_as(app, alice).post(JOBS, json={"name": "a"}, headers=key)
    b = client_as(app, bob).post(JOBS, json={"name": "b"}, headers=key)
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.get_json()["id"] != b.get_json()["id"]
    again = client_as(app, alice).post(JOBS, json={"name": "a"}, headers=key)
    assert again.status_code == 200 and again.get_json()["id"] == a.get_json()["id"]


def test_a_submitted_job_belongs_to_its_submitter(
    client: FlaskClient, admin: Caller, sessions: sessionmaker[Session]
) -> None:
    from shared.models import Job

    job_id = client.post(JOBS, json={}).get_json()["id"]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.owner_id == admin.id
