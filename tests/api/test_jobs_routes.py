"""The job routes: submit, show, list with pagination, cancel, metrics, idempotency, outbox."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Job
from shared.store import LocalStore
from tests.api.conftest import RecordingPublisher, add_artifact, insert_job, insert_metrics

JOBS = "/api/v1/jobs"


@pytest.fixture
def database_url(any_database_url: str) -> str:
    """Every route test here runs on SQLite and on PostgreSQL."""
    return any_database_url


def test_submit_stores_a_queued_job_and_publishes_it(
    client: FlaskClient, publisher: RecordingPublisher
) -> None:
    response = client.post(JOBS, json={"name": "first", "hyperparameters": {"n_epochs": 2}})
    assert response.status_code == 201
    job = response.get_json()
    assert response.headers["Location"] == f"{JOBS}/{job['id']}"
    assert job["status"] == "queued"
    assert job["name"] == "first"
    assert job["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["batch_size_train"] == 64  # the seed recipe's default
    assert job["queue"] == "cpu"
    assert job["published_at"] is not None
    assert job["progress"]["n_epochs"] == 2
    assert publisher.calls == [(job["id"], "cpu")]


def test_cuda_jobs_go_to_the_gpu_queue(client: FlaskClient, publisher: RecordingPublisher) -> None:
    job = client.post(JOBS, json={"device": "cuda"}).get_json()
    assert job["hyperparameters"]["device"] == "cuda"
    assert job["device_requested"] == "cuda"
    assert publisher.calls == [(job["id"], "gpu")]


def test_broker_down_still_answers_201_and_leaves_published_at_null(
    client: FlaskClient, publisher: RecordingPublisher, sessions: sessionmaker[Session]
) -> None:
    publisher.down = True
    response = client.post(JOBS, json={})
    assert response.status_code == 201
    job_id = response.get_json()["id"]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status == "queued"
        assert job.published_at is None


def test_get_unknown_job_is_404(client: FlaskClient) -> None:
    response = client.get(f"{JOBS}/{'0' * 32}")
    assert response.status_code == 404
    assert response.get_json()["error"] == "job_not_found"


def test_job_shows_progress_eta_results_and_links(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    job_id = insert_job(
        sessions,
        status="running",
        epoch=2,
        n_epochs=3,
        step=100,
        steps_per_epoch=938,
        samples_seen=90000,
        total_samples=180000,
        samples_per_second=3000.0,
        started_at=started,
        worker_hostname="w1",
        attempt=1,
    )
    insert_metrics(sessions, job_id, [_test_point(1, 0.2, 0.94)])
    add_artifact(sessions, store, job_id, "checkpoints/epoch-1.pt", b"ckpt")
    job = client.get(f"{JOBS}/{job_id}").get_json()
    assert job["progress"]["fraction"] == 0.5
    assert job["progress"]["eta_seconds"] == 30.0
    assert job["started_at"] == "2026-01-02T03:04:05Z"
    assert job["worker"] == "w1"
    assert job["test_metrics"] == [{"epoch": 1, "loss": 0.2, "accuracy": 0.94}]
    [artifact] = job["artifacts"]
    assert artifact["kind"] == "checkpoint"
    assert artifact["url"] == f"{JOBS}/{job_id}/artifacts/checkpoints/epoch-1.pt"
    assert job["links"]["cancel"] == f"{JOBS}/{job_id}/cancel"


def test_failed_job_shows_its_error(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    job_id = insert_job(sessions, status="failed", error_message="boom", error_traceback="tb")
    job = client.get(f"{JOBS}/{job_id}").get_json()
    assert job["error"] == {"message": "boom", "traceback": "tb"}


def _test_point(epoch: int, loss: float, accuracy: float) -> dict[str, object]:
    return {
        "kind": "test",
        "epoch": epoch,
        "step": epoch * 938,
        "samples_seen": epoch * 60000,
        "loss": loss,
        "accuracy": accuracy,
        "seconds": 10.0 * epoch,
    }


def test_metrics_route_returns_train_and_test_series(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="running")
    train = [
        {
            "kind": "train",
            "epoch": 1,
            "step": s,
            "samples_seen": s * 64,
            "loss": 2.0 / s,
            "accuracy": None,
            "seconds": s / 10,
        }
        for s in (10, 20, 30)
    ]
    insert_metrics(sessions, job_id, [*train, _test_point(1, 0.3, 0.91)])
    body = client.get(f"{JOBS}/{job_id}/metrics").get_json()
    assert body["job_id"] == job_id
    assert [p["step"] for p in body["train"]] == [10, 20, 30]
    assert body["train"][0]["samples_seen"] == 640
    assert body["test"] == [
        {
            "epoch": 1,
            "step": 938,
            "samples_seen": 60000,
            "loss": 0.3,
            "accuracy": 0.91,
            "seconds": 10.0,
        }
    ]
    assert client.get(f"{JOBS}/{'f' * 32}/metrics").status_code == 404


def test_list_is_newest_first_and_pages_with_a_cursor(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    # Two share a timestamp: the id breaks the tie, and no page repeats or skips one.
    stamps = [base, base + timedelta(seconds=1), base + timedelta(seconds=1), base + timedelta(2)]
    ids = [insert_job(sessions, created_at=ts) for ts in stamps]
    expected = sorted(ids, key=lambda i: (stamps[ids.index(i)], i), reverse=True)
    seen: list[str] = []
    url = f"{JOBS}?limit=1"
    while True:
        page = client.get(url).get_json()
        seen += [job["id"] for job in page["items"]]
        if page["next_cursor"] is None:
            break
        url = f"{JOBS}?limit=1&cursor={page['next_cursor']}"
    assert seen == expected


def test_list_filters_by_status(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    queued = insert_job(sessions, status="queued")
    running = insert_job(sessions, status="running")
    insert_job(sessions, status="failed")
    only_queued = client.get(f"{JOBS}?status=queued").get_json()["items"]
    assert [j["id"] for j in only_queued] == [queued]
    both = client.get(f"{JOBS}?status=queued&status=running").get_json()["items"]
    assert {j["id"] for j in both} == {queued, running}


def test_same_idempotency_key_returns_the_same_job(
    client: FlaskClient, publisher: RecordingPublisher
) -> None:
    headers = {"Idempotency-Key": "retry-42"}
    first = client.post(JOBS, json={"name": "once"}, headers=headers)
    again = client.post(JOBS, json={"name": "once"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert len(publisher.calls) == 1


def test_same_key_with_another_body_is_422(client: FlaskClient) -> None:
    headers = {"Idempotency-Key": "k"}
    assert client.post(JOBS, json={"name": "a"}, headers=headers).status_code == 201
    response = client.post(JOBS, json={"name": "b"}, headers=headers)
    assert response.status_code == 422
    assert response.get_json()["error"] == "idempotency_key_reused"


def test_cancel_a_queued_job_cancels_it_at_once(client: FlaskClient) -> None:
    job_id = client.post(JOBS, json={}).get_json()["id"]
    response = client.post(f"{JOBS}/{job_id}/cancel")
    assert response.status_code == 202
    job = response.get_json()
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None


def test_cancel_a_running_job_sets_the_flag(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status="running", lease_token="t")
    job = client.post(f"{JOBS}/{job_id}/cancel").get_json()
    assert job["status"] == "running"
    assert job["cancel_requested"] is True


def test_cancel_a_finished_job_is_409(client: FlaskClient, sessions: sessionmaker[Session]) -> None:
    job_id = insert_job(sessions, status="succeeded")
    response = client.post(f"{JOBS}/{job_id}/cancel")
    assert response.status_code == 409
    assert response.get_json()["error"] == "job_state_conflict"
    with sessions() as session:
        assert session.scalars(select(Job.status).where(Job.id == job_id)).one() == "succeeded"


def test_resume_from_newest_checkpoint(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    source = insert_job(sessions, status="succeeded")
    for epoch in (1, 2):
        add_artifact(sessions, store, source, f"checkpoints/epoch-{epoch}.pt", b"c")
    body = {"resume_from": {"job_id": source}, "hyperparameters": {"n_epochs": 4}}
    job = client.post(JOBS, json=body).get_json()
    assert job["resume_from"] == {"job_id": source, "epoch": 2}


def test_resume_needs_more_epochs_than_the_checkpoint(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    source = insert_job(sessions, status="succeeded")
    add_artifact(sessions, store, source, "checkpoints/epoch-3.pt", b"c")
    body = {"resume_from": {"job_id": source, "epoch": 3}, "hyperparameters": {"n_epochs": 3}}
    response = client.post(JOBS, json=body)
    assert response.status_code == 422
    assert response.get_json()["details"][0]["loc"] == ["body", "hyperparameters", "n_epochs"]


def test_resume_from_a_missing_checkpoint_is_422(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    source = insert_job(sessions, status="failed")
    for resume, loc in (
        ({"job_id": source}, ["body", "resume_from", "job_id"]),
        ({"job_id": source, "epoch": 1}, ["body", "resume_from", "epoch"]),
        ({"job_id": "f" * 32}, ["body", "resume_from", "job_id"]),
    ):
        response = client.post(JOBS, json={"resume_from": resume})
        assert response.status_code == 422, resume
        assert response.get_json()["details"][0]["loc"] == loc
