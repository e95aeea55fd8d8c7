"""A job's log and its live streams over HTTP: pages, text, SSE replay and ownership."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from api.events import FEED_KEY, REPLAY_BATCH
from api.feed import REPLAY_SLOTS
from shared import events
from shared.config import Settings
from shared.events import NewEvent
from shared.models import EventKind, Job, JobStatus
from tests.api.conftest import Caller, client_as, insert_job, make_settings


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Streams that poll often and close after a second, so a test never hangs on one."""
    return make_settings(tmp_path, database_url, events_poll_seconds=0.02,
                         events_stream_seconds=1.0)  # fmt: skip


def add_lines(sessions: sessionmaker[Session], job_id: str, *messages: str) -> None:
    with sessions() as session, session.begin():
        events.append(session, job_id, [events.line(m) for m in messages])


def finish(sessions: sessionmaker[Session], job_id: str, status: JobStatus) -> None:
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status
        session.flush()
        events.status_changed(session, job_id, "finished", f"{status.value}: done")


def frames(body: str) -> list[dict[str, Any]]:
    """The events of an SSE body: [{id, event, data}] (comments and retry left out)."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append({"id": fields.get("id"), "event": fields["event"],
                          "data": json.loads(fields["data"])})  # fmt: skip
    return found


def test_the_log_pages_in_order_and_is_complete_once_the_job_is_finished(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING, attempt=1)
    add_lines(sessions, job_id, "claimed", "Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.301000", "c")
    first = client.get(f"/api/v1/jobs/{job_id}/logs?limit=2").get_json()
    assert [line["message"] for line in first["lines"]] == [
        "claimed", "Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.301000"
    ]  # fmt: skip
    assert [line["attempt"] for line in first["lines"]] == [1, 1]
    assert first["next_after"] == first["lines"][1]["seq"] and first["complete"] is False
    rest = client.get(f"/api/v1/jobs/{job_id}/logs?after={first['next_after']}").get_json()
    assert [line["message"] for line in rest["lines"]] == ["c"] and rest["complete"] is False
    finish(sessions, job_id, JobStatus.SUCCEEDED)
    last = client.get(f"/api/v1/jobs/{job_id}/logs?after={rest['next_after']}").get_json()
    assert [line["message"] for line in last["lines"]] == ["succeeded: done"]
    assert last["complete"] is True
    text = client.get(f"/api/v1/jobs/{job_id}/logs.txt")
    assert text.mimetype == "text/plain"
    assert text.get_data(as_text=True) == (
        "claimed\nTrain Epoch: 1 [0/60000 (0%)]\tLoss: 2.301000\nc\nsucceeded: done\n"
    )


@pytest.mark.parametrize("query", ["after=-1", "limit=0", "limit=1001", "after=x", "since=1"])
def test_bad_log_queries_name_the_field(
    client: FlaskClient, sessions: sessionmaker[Session], query: str
) -> None:
    job_id = insert_job(sessions)
    response = client.get(f"/api/v1/jobs/{job_id}/logs?{query}")
    assert response.status_code == 422
    assert response.get_json()["details"][0]["loc"][0] == "query"


def test_a_finished_jobs_stream_replays_everything_then_ends(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING, attempt=1)
    progress = {"epoch": 1, "step": 5, "fraction": 0.5}
    with sessions() as session, session.begin():
        events.append(session, job_id, [
            events.line("Train Epoch: 1 [0/60000 (0%)]\tLoss: 2.3", epoch=1),
            NewEvent(kind=EventKind.METRIC, data={"kind": "train", "loss": 2.3}, epoch=1),
            NewEvent(kind=EventKind.PROGRESS, data=progress),
        ])  # fmt: skip
    finish(sessions, job_id, JobStatus.SUCCEEDED)
    response = client.get(f"/api/v1/jobs/{job_id}/events")
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    got = frames(response.get_data(as_text=True))
    assert [f["event"] for f in got] == ["log", "metric", "progress", "log", "status", "end"]
    ids = [int(f["id"]) for f in got[:-1]]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert got[0]["data"]["message"].startswith("Train Epoch: 1 [0/60000 (0%)]")
    assert got[0]["data"]["seq"] == ids[0] and got[0]["data"]["job_id"] == job_id
    assert got[2]["data"]["fraction"] == 0.5
    assert got[4]["data"]["status"] == "succeeded" and got[4]["data"]["finished"] is True
    # A reconnect with the last id it saw gets only what came after.
    again = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[2])})
    assert [f["event"] for f in frames(again.get_data(as_text=True))] == ["log", "status", "end"]
    query = client.get(f"/api/v1/jobs/{job_id}/events?after={ids[3]}")
    assert [f["event"] for f in frames(query.get_data(as_text=True))] == ["status", "end"]


def test_a_long_backlog_is_replayed_in_batches_in_order_once_holding_no_slot_between(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING, attempt=1)
    count = 2 * REPLAY_BATCH + 50
    add_lines(sessions, job_id, *(f"line {n}" for n in range(count)))
    finish(sessions, job_id, JobStatus.SUCCEEDED)
    response = client.get(f"/api/v1/jobs/{job_id}/events", buffered=False)
    chunks = iter(cast(Iterator[bytes], response.response))
    assert next(chunks) == b"retry: 2000\n\n"
    feed = app.extensions[FEED_KEY]
    batches = []
    for chunk in chunks:
        # Between two batches the stream holds none of the process's replay slots.
        taken = [feed.replay_slots.acquire(blocking=False) for _ in range(REPLAY_SLOTS)]
        for _ in range(sum(taken)):
            feed.replay_slots.release()
        assert all(taken)
        batches.append(frames(chunk.decode()))
    response.close()
    got = [f for batch in batches for f in batch]
    # 50 lines left, then the end's log line and status event; then `end`.
    assert [len(batch) for batch in batches] == [REPLAY_BATCH, REPLAY_BATCH, 52, 1]
    assert [f["data"]["message"] for f in got[:count]] == [f"line {n}" for n in range(count)]
    assert [f["event"] for f in got[count:]] == ["log", "status", "end"]
    ids = [int(f["id"]) for f in got[:-1]]
    assert ids == sorted(set(ids))


def test_an_open_stream_sends_new_events_and_keep_alives(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    app.extensions["mnistq"].settings.events_keepalive_seconds = 0.05
    job_id = insert_job(sessions, status=JobStatus.RUNNING, attempt=1)
    response = client.get(f"/api/v1/jobs/{job_id}/events", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"retry: 2000\n\n"
    assert next(chunks) == b": keep-alive\n\n"  # nothing to say yet
    add_lines(sessions, job_id, "later")
    body = b"".join(cast(Iterator[bytes], chunks)).decode()
    assert [f["data"]["message"] for f in frames(body)] == ["later"]
    response.close()


@pytest.mark.parametrize("value", ["abc", "-1", "99999999999999999999999"])
def test_a_bad_last_event_id_is_a_422_naming_the_header(
    client: FlaskClient, sessions: sessionmaker[Session], value: str
) -> None:
    job_id = insert_job(sessions)
    response = client.get(f"/api/v1/jobs/{job_id}/events", headers={"Last-Event-ID": value})
    assert response.status_code == 422
    assert response.get_json()["details"][0]["loc"] == ["header", "Last-Event-ID"]


def test_logs_and_streams_are_the_owners_only(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, bob: Caller
) -> None:
    mine = insert_job(sessions, owner_id=alice.id)
    theirs = insert_job(sessions, owner_id=bob.id)
    add_lines(sessions, mine, "alice's line")
    add_lines(sessions, theirs, "bob's line")
    as_alice = client_as(app, alice)
    for path in ("logs", "logs.txt", "events"):
        assert as_alice.get(f"/api/v1/jobs/{theirs}/{path}").status_code == 404
    # The all-jobs stream, replayed from the start, holds only alice's job.
    body = as_alice.get("/api/v1/events", headers={"Last-Event-ID": "0"}).get_data(as_text=True)
    assert [f["data"]["message"] for f in frames(body)] == ["alice's line"]
    assert "event: end" not in body


def test_the_all_jobs_stream_starts_now_without_last_event_id(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions)
    add_lines(sessions, job_id, "before")
    body = client.get("/api/v1/events").get_data(as_text=True)
    assert frames(body) == []
