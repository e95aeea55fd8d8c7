"""Priorities, the lease in a job's JSON, and the workers and queues routes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.db import SESSIONS_KEY
from shared import workers
from shared.artifacts import describe
from shared.db import make_engine, make_session_factory
from shared.models import Artifact, Worker, utcnow
from shared.store import make_store
from shared.workers import WorkerInfo
from tests.api.conftest import (
    Caller,
    RecordingPublisher,
    add_user,
    client_as,
    insert_job,
    make_settings,
)
from tests.seaweedfs import SeaweedFS

JOBS = "/api/v1/jobs"


@pytest.fixture
def database_url(any_database_url: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL."""
    return any_database_url


def register(sessions: sessionmaker[Session], queues: tuple[str, ...] = ("cpu",)) -> WorkerInfo:
    """A worker's first beat, as its main process sends it."""
    info = WorkerInfo(
        id=workers.new_worker_id(), name="celery@box", hostname="box", pid=4242,
        queues=queues, concurrency=2, heartbeat_seconds=5.0,
    )  # fmt: skip
    workers.beat(sessions, info)
    return info


@pytest.mark.parametrize("priority", [-101, 101, 1.5, "high", True, None])
def test_a_priority_outside_minus_100_to_100_is_refused_naming_the_field(
    client: FlaskClient, priority: object
) -> None:
    response = client.post(JOBS, json={"priority": priority})
    assert response.status_code in (400, 422)
    assert ["body", "priority"] in [d["loc"] for d in response.get_json()["details"]]


def test_priority_is_stored_and_defaults_to_zero(client: FlaskClient) -> None:
    assert client.post(JOBS, json={}).get_json()["priority"] == 0
    assert client.post(JOBS, json={"priority": -100}).get_json()["priority"] == -100
    assert client.post(JOBS, json={"priority": 100}).get_json()["priority"] == 100


def test_queue_positions_follow_priority_then_age(client: FlaskClient) -> None:
    ids = [client.post(JOBS, json={"priority": p}).get_json()["id"] for p in (0, 0, 50, -10)]
    positions = [client.get(f"{JOBS}/{i}").get_json()["queue_status"]["position"] for i in ids]
    assert positions == [2, 3, 1, 4]
    listed = {j["id"]: j["queue_status"]["position"] for j in client.get(JOBS).get_json()["items"]}
    assert [listed[i] for i in ids] == [2, 3, 1, 4]


def test_a_pages_positions_are_each_jobs_own_in_every_queue(any_database_url: str) -> None:
    # A page is ranked in one pass, one job is counted: both must give the claim's order
    # (priority, then age, then id), each queue on its own, and nothing for a job not queued.
    engine = make_engine(any_database_url)
    sessions = make_session_factory(engine)
    at = utcnow()
    rows = [("cpu", 0, 0), ("cpu", 5, 1), ("gpu", 0, 0), ("cpu", 0, 0), ("gpu", 9, 2),
            ("cpu", -3, 0), ("cpu", 5, 1), ("gpu", 0, 3)]  # fmt: skip
    made = [
        (insert_job(sessions, queue=queue, priority=priority,
                    created_at=at + timedelta(seconds=age)), queue, priority, age)
        for queue, priority, age in rows
    ]  # fmt: skip
    running = insert_job(sessions, queue="cpu", priority=99, status="running")
    expected: dict[str, int] = {}
    for queue in ("cpu", "gpu"):
        mine = sorted((row for row in made if row[1] == queue), key=lambda r: (-r[2], r[3], r[0]))
        expected |= {job_id: place for place, (job_id, *_) in enumerate(mine, start=1)}
    ids = [job_id for job_id, *_ in made] + [running]
    try:
        with sessions() as session:
            page = workers.queue_positions(session, ids)
            one_by_one = {i: workers.queue_positions(session, [i]).get(i) for i in ids}
    finally:
        engine.dispose()
    assert page == expected
    assert one_by_one == expected | {running: None}


def test_patch_changes_a_queued_jobs_priority_and_its_place(client: FlaskClient) -> None:
    first, second = (client.post(JOBS, json={}).get_json()["id"] for _ in range(2))
    response = client.patch(f"{JOBS}/{second}", json={"priority": 7})
    assert response.status_code == 200 and response.get_json()["priority"] == 7
    assert response.get_json()["queue_status"]["position"] == 1
    assert client.get(f"{JOBS}/{first}").get_json()["queue_status"]["position"] == 2


@pytest.mark.parametrize(
    "body", [{"priority": 500}, {"priority": "1"}, {}, {"priority": 1, "name": "x"}, [1]]
)
def test_patch_refuses_bad_bodies_naming_the_field(client: FlaskClient, body: object) -> None:
    job_id = client.post(JOBS, json={}).get_json()["id"]
    response = client.patch(f"{JOBS}/{job_id}", json=body)
    assert response.status_code in (400, 422), response.get_json()
    assert response.get_json()["error"] in ("validation_error", "malformed_json")


@pytest.mark.parametrize("status", ["running", "succeeded", "cancelled"])
def test_patch_of_a_job_that_no_longer_waits_is_409(
    client: FlaskClient, sessions: sessionmaker[Session], status: str
) -> None:
    job_id = insert_job(sessions, status=status)
    response = client.patch(f"{JOBS}/{job_id}", json={"priority": 5})
    assert (response.status_code, response.get_json()["error"]) == (409, "job_state_conflict")


def test_patch_of_another_users_job_is_404(app: Flask, alice: Caller, bob: Caller) -> None:
    job_id = client_as(app, alice).post(JOBS, json={}).get_json()["id"]
    response = client_as(app, bob).patch(f"{JOBS}/{job_id}", json={"priority": 5})
    assert response.status_code == 404


def test_a_running_job_says_when_its_lease_expired(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    now = utcnow()
    healthy = insert_job(sessions, status="running", lease_token="t",
                         lease_expires_at=now + timedelta(seconds=30), worker_pid=77)  # fmt: skip
    stale = insert_job(sessions, status="running", lease_token="t",
                       lease_expires_at=now - timedelta(minutes=6))  # fmt: skip
    fine = client.get(f"{JOBS}/{healthy}").get_json()["lease"]
    assert (fine["expired"], fine["pid"], fine["message"]) == (False, 77, None)
    dead = client.get(f"{JOBS}/{stale}").get_json()["lease"]
    assert dead["expired"] is True and "stopped heartbeating" in dead["message"]
    assert client.post(JOBS, json={}).get_json()["lease"] is None


def test_workers_lists_each_worker_with_its_jobs_and_state(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    live = register(sessions)
    gone = register(sessions)
    with sessions() as session, session.begin():
        row = session.get(Worker, gone.id)
        assert row is not None
        row.last_seen_at = utcnow() - timedelta(minutes=5)
    job_id = insert_job(sessions, status="running", worker_id=live.id)
    items = {w["id"]: w for w in client.get("/api/v1/workers").get_json()["items"]}
    assert items[live.id]["state"] == "live" and items[live.id]["jobs"] == [job_id]
    assert (items[live.id]["queues"], items[live.id]["slots"]) == (["cpu"], 2)
    assert items[gone.id]["state"] == "lost"


def test_a_user_sees_only_their_own_jobs_on_a_worker(
    app: Flask, alice: Caller, bob: Caller, sessions: sessionmaker[Session]
) -> None:
    info = register(sessions)
    mine = insert_job(sessions, status="running", worker_id=info.id, owner_id=alice.id)
    insert_job(sessions, status="running", worker_id=info.id, owner_id=bob.id)
    items = client_as(app, alice).get("/api/v1/workers").get_json()["items"]
    assert [w["jobs"] for w in items] == [[mine]]


def test_only_an_admin_may_drain_and_a_drained_worker_serves_no_queue(
    app: Flask, client: FlaskClient, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    info = register(sessions)
    job_id = client.post(JOBS, json={}).get_json()["id"]
    assert client.get(f"{JOBS}/{job_id}").get_json()["queue_status"]["live_workers"] == 1
    refused = client_as(app, alice).post(f"/api/v1/workers/{info.id}/drain")
    assert refused.status_code == 403
    response = client.post(f"/api/v1/workers/{info.id}/drain")
    assert (response.status_code, response.get_json()["state"]) == (202, "draining")
    assert workers.beat(sessions, info) == "draining"  # its next beat learns it, and keeps it
    status = client.get(f"{JOBS}/{job_id}").get_json()["queue_status"]
    assert status["live_workers"] == 0 and "no live worker" in status["message"]
    missing = client.post(f"/api/v1/workers/{'0' * 32}/drain")
    assert (missing.status_code, missing.get_json()["error"]) == (404, "worker_not_found")


def test_queues_count_queued_and_running_jobs_and_live_workers(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    register(sessions, ("cpu", "gpu"))
    for _ in range(2):
        client.post(JOBS, json={})
    insert_job(sessions, status="running")
    client.post(JOBS, json={"device": "cuda"})
    items = {q["name"]: q for q in client.get("/api/v1/queues").get_json()["items"]}
    cpu, gpu = items["cpu"], items["gpu"]
    assert (cpu["queued"], cpu["running"], cpu["live_workers"]) == (2, 1, 1)
    assert (gpu["queued"], gpu["running"], gpu["live_workers"]) == (1, 0, 1)
    assert cpu["oldest_wait_seconds"] >= 0


def test_the_workers_page_shows_workers_and_queues_and_drains_for_admins(
    app: Flask, admin: Caller, alice: Caller, sessions: sessionmaker[Session]
) -> None:
    from tests.api.test_dashboard import csrf_of, signed_in

    info = register(sessions)
    job_id = insert_job(sessions, status="running", worker_id=info.id)
    browser = signed_in(app, admin)
    page = browser.get("/ui/workers").get_data(as_text=True)
    assert info.id in page and "box" in page and job_id[:8] in page and "Drain" in page
    assert "<td>cpu</td>" in page  # the queues table
    token = csrf_of(browser, "/ui/workers")
    drained = browser.post(f"/ui/workers/{info.id}/drain", data={"csrf_token": token})
    assert drained.status_code == 302
    with sessions() as session:
        row = session.get(Worker, info.id)
        assert row is not None and row.state == "draining"
    user = signed_in(app, alice)
    assert "Drain</button>" not in user.get("/ui/workers").get_data(as_text=True)
    refused = user.post(f"/ui/workers/{info.id}/drain", data={"csrf_token": csrf_of(user)})
    assert refused.status_code == 302  # back to the page, with the refusal flashed
    assert "Only an admin" in user.get("/ui/workers").get_data(as_text=True)


def test_downloads_stream_from_s3_and_a_store_outage_is_a_503(
    tmp_path: Path, database_url: str, seaweedfs: SeaweedFS, s3_env: dict[str, str]
) -> None:
    settings = make_settings(
        tmp_path, database_url, artifact_url=f"s3://{seaweedfs.new_bucket()}/runs",
        s3_endpoint_url=seaweedfs.endpoint_url, artifact_dir=tmp_path / "unused",
    )  # fmt: skip
    app = create_app(settings, publish=RecordingPublisher())
    sessions = app.extensions[SESSIONS_KEY]
    admin = add_user(sessions, "root", admin=True)
    job_id = insert_job(sessions, status="succeeded")
    scratch = tmp_path / "scratch" / "metrics.json"
    scratch.parent.mkdir()
    scratch.write_bytes(b'{"ok": true}')
    size, sha = describe(scratch)
    make_store(settings).put(job_id, "metrics.json", scratch, sha256=sha)
    with sessions() as session, session.begin():
        session.add(Artifact(job_id=job_id, name="metrics.json", kind="log", size=size, sha256=sha))
    client = client_as(app, admin)
    url = f"{JOBS}/{job_id}/artifacts/metrics.json"
    response = client.get(url)
    assert (response.status_code, response.data) == (200, b'{"ok": true}')
    assert response.headers["ETag"] == f'"{sha}"' and response.content_length == size
    assert client.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    assert not (tmp_path / "unused").exists()

    down = make_settings(
        tmp_path, database_url, artifact_url="s3://mnistq/runs",
        s3_endpoint_url="http://127.0.0.1:9",  # nothing listens there
    )  # fmt: skip
    outage = client_as(create_app(down, publish=RecordingPublisher()), admin)
    failed = outage.get(url)
    assert (failed.status_code, failed.get_json()["error"]) == (503, "store_unavailable")
    assert "127.0.0.1" not in failed.get_data(as_text=True)
