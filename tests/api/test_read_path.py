"""The read path: a fixed number of queries per answer, cached tokens, 304s, metric pages."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, url_for
from flask.testing import FlaskClient
from sqlalchemy import delete, event
from sqlalchemy.orm import Session, sessionmaker

from api import create_app
from api.answer_cache import KEY as ANSWERS_KEY
from api.answer_cache import FinishedJobAnswers
from api.db import ENGINE_KEY, SESSIONS_KEY, get_session
from shared.auth import create_token
from shared.models import Job, JobStatus, Worker, utcnow
from shared.store import LocalStore
from tests.api.conftest import (
    Caller,
    RecordingPublisher,
    add_artifact,
    add_user,
    client_as,
    empty_tables,
    insert_job,
    insert_metrics,
    make_settings,
)

JOBS = "/api/v1/jobs"
NAMES = ("model.pth", "metrics.json", "examples.png", "checkpoints/epoch-1.pt")


@pytest.fixture
def database_url(any_database_url: str) -> str:
    """Counted on SQLite and on PostgreSQL."""
    return any_database_url


class Statements:
    """Every SQL statement the app's engine sends, by text."""

    def __init__(self, app: Flask) -> None:
        self.sent: list[str] = []
        self.engine = app.extensions[ENGINE_KEY]
        event.listen(self.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.sent.append(statement)

    def during(self, client: FlaskClient, path: str, **kwargs: Any) -> list[str]:
        """The statements of one GET of ``path`` (after a first GET that fills the caches)."""
        assert client.get(path, **kwargs).status_code == 200
        self.sent.clear()
        assert client.get(path, **kwargs).status_code in (200, 304)
        return list(self.sent)

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


@pytest.fixture
def statements(app: Flask) -> Iterator[Statements]:
    """The app's statements, recorded."""
    recorder = Statements(app)
    yield recorder
    recorder.close()


def _finished_job(sessions: sessionmaker[Session], store: LocalStore) -> str:
    job_id = insert_job(sessions, status=JobStatus.SUCCEEDED)
    for name in NAMES:
        add_artifact(sessions, store, job_id, name, b"x")
    insert_metrics(sessions, job_id, [_test(epoch) for epoch in (1, 2, 3)])
    return job_id


def _test(epoch: int) -> dict[str, Any]:
    return {"kind": "test", "epoch": epoch, "step": 938 * epoch, "samples_seen": 60000 * epoch,
            "loss": 0.1, "accuracy": 0.97, "seconds": 5.0 * epoch}  # fmt: skip


def _train(step: int) -> dict[str, Any]:
    return {"kind": "train", "epoch": 1, "step": step, "samples_seen": 64 * step,
            "loss": 1.0 / step, "accuracy": None, "seconds": step / 100}  # fmt: skip


def _queued_jobs(sessions: sessionmaker[Session], n: int) -> None:
    with sessions() as session, session.begin():
        session.add(Worker(id=uuid.uuid4().hex, name="w@host", hostname="host", pid=1, queues="cpu",
                           concurrency=1, heartbeat_seconds=5.0, last_seen_at=utcnow(),
                           started_at=utcnow()))  # fmt: skip
    for _ in range(n):
        insert_job(sessions, status=JobStatus.QUEUED, queue="cpu", queued_at=utcnow())


def test_a_finished_job_costs_three_queries_then_one_and_no_token_lookup(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore,
    statements: Statements,
) -> None:  # fmt: skip
    job_id = _finished_job(sessions, store)
    url = f"{JOBS}/{job_id}"
    first = client.get(url)
    # The job, its artifacts, its test results; the token came from the cache.
    statements.sent.clear()
    assert client_as_fresh_process(client, url) == first.data
    assert len(statements.sent) == 3, statements.sent
    # Then the kept answer: one look at the row says it is still there and finished.
    statements.sent.clear()
    again = client.get(url)
    assert again.data == first.data and again.headers["ETag"] == first.headers["ETag"]
    assert len(statements.sent) == 1, statements.sent
    assert not any("api_token" in s or "user_account" in s for s in statements.sent)


def client_as_fresh_process(client: FlaskClient, url: str) -> bytes:
    """The answer to a GET with no answers kept, as a new API process would give it."""
    answers: FinishedJobAnswers = client.application.extensions[ANSWERS_KEY]
    answers.forget(url.rsplit("/", 1)[1])
    return client.get(url).data


def test_a_cached_token_serves_every_view_and_is_read_once(
    tmp_path: Path, database_url: str, publisher: RecordingPublisher,
    sessions: sessionmaker[Session],
) -> None:  # fmt: skip
    app = create_app(make_settings(tmp_path, database_url, token_cache_seconds=60,
                                   webhook_allow_private=True),
                     publish=publisher)  # fmt: skip
    alice = add_user(sessions, "alice")
    with sessions() as session:
        create_token(session, "alice")  # a second token, which /me lists from the database
    job_id = insert_job(sessions, status=JobStatus.SUCCEEDED, owner_id=alice.id)
    client = client_as(app, alice)
    recorder = Statements(app)
    try:
        # Views that only read who the caller is, and views that load more of the user (its
        # tokens) or own something by it, all on the one cached token, in any order.
        for _ in range(2):
            assert client.get(f"{JOBS}/{job_id}").status_code == 200
            me = client.get("/api/v1/me").get_json()
            assert (me["name"], len(me["tokens"])) == ("alice", 2)
            hook = client.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                                         "events": ["job.succeeded"]})  # fmt: skip
            assert hook.status_code == 201, hook.get_json()
            assert client.get(JOBS).get_json()["items"][0]["id"] == job_id
        by_secret = [s for s in recorder.sent if "api_token.token_hash = " in s]
        assert len(by_secret) == 1, by_secret  # the first request's look-up, then the cache
    finally:
        recorder.close()
        app.extensions[ENGINE_KEY].dispose()


def test_links_are_what_url_for_gives_in_each_request_wherever_the_app_is_mounted(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    job_id = _finished_job(sessions, store)
    for root in ("", "/mnistq", ""):  # URLs are built per request, under its own root
        base_url = f"http://localhost{root}/"
        (job,) = client.get(JOBS, base_url=base_url).get_json()["items"]
        with app.test_request_context(base_url=base_url):
            links = {"self": url_for("jobs.get", job_id=job_id),
                     "metrics": url_for("jobs.metrics", job_id=job_id),
                     "artifacts": url_for("artifacts.index", job_id=job_id),
                     "cancel": url_for("jobs.cancel", job_id=job_id)}  # fmt: skip
            urls = {n: url_for("artifacts.download", job_id=job_id, name=n) for n in NAMES}
        assert links["self"] == f"{root}/api/v1/jobs/{job_id}"
        assert job["links"] == links
        assert {a["name"]: a["url"] for a in job["artifacts"]} == urls


def test_a_kept_answer_is_the_owners_only_and_gone_with_the_row(
    app: Flask, sessions: sessionmaker[Session], alice: Caller, bob: Caller
) -> None:
    job_id = insert_job(sessions, status=JobStatus.SUCCEEDED, owner_id=alice.id,
                        finished_at=utcnow())  # fmt: skip
    url = f"{JOBS}/{job_id}"
    as_alice, as_bob = client_as(app, alice), client_as(app, bob)
    assert as_alice.get(url).status_code == 200
    assert as_alice.get(url).status_code == 200  # from the kept answer
    assert as_bob.get(url).status_code == 404
    with sessions() as session, session.begin():
        session.execute(delete(Job).where(Job.id == job_id))
    assert as_alice.get(url).status_code == 404


def test_a_running_job_is_never_kept_and_a_finished_one_only_as_it_finished(
    client: FlaskClient, sessions: sessionmaker[Session], statements: Statements
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING)
    url = f"{JOBS}/{job_id}"
    client.get(url)
    assert len(statements.during(client, url)) == 3  # every GET reads the job afresh
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.status, job.finished_at = JobStatus.FAILED, utcnow()
    assert client.get(url).get_json()["status"] == "failed"
    # Were the row to change all the same, the kept answer is not used.
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        job.status = JobStatus.SUCCEEDED
    assert client.get(url).get_json()["status"] == "succeeded"


def test_at_most_size_answers_are_kept_the_least_recently_used_let_go(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    answers: FinishedJobAnswers = client.application.extensions[ANSWERS_KEY]
    answers.size = 2
    first, second, third = (insert_job(sessions, status=JobStatus.SUCCEEDED) for _ in range(3))
    for job_id in (first, second, first, third):
        assert client.get(f"{JOBS}/{job_id}").status_code == 200
    assert list(answers._answers) == [first, third]


def test_a_queued_job_adds_only_its_position_and_the_live_workers(
    client: FlaskClient, sessions: sessionmaker[Session], statements: Statements
) -> None:
    _queued_jobs(sessions, 3)
    job_id = client.get(JOBS).get_json()["items"][0]["id"]
    sent = statements.during(client, f"{JOBS}/{job_id}")
    assert len(sent) == 5, sent


@pytest.mark.parametrize("jobs", [2, 20])
def test_the_job_list_costs_the_same_queries_for_any_page_size(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore,
    statements: Statements, jobs: int,
) -> None:  # fmt: skip
    for _ in range(jobs):
        _finished_job(sessions, store)
    _queued_jobs(sessions, jobs)
    sent = statements.during(client, f"{JOBS}?limit=100")
    # The page, artifacts, test results, queue positions, live workers: no query per job.
    assert len(sent) == 5, sent
    assert len(client.get(f"{JOBS}?limit=100").get_json()["items"]) == 2 * jobs


def test_a_get_sends_no_transaction(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore,
    statements: Statements,
) -> None:  # fmt: skip
    job_id = _finished_job(sessions, store)
    sent = statements.during(client, f"{JOBS}/{job_id}")
    assert all(s.lstrip().upper().startswith("SELECT") for s in sent), sent


@pytest.mark.parametrize("path", ["{jobs}/{id}", "{jobs}", "{jobs}/{id}/metrics"])
def test_a_conditional_get_of_an_unchanged_answer_is_304(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore, path: str
) -> None:
    job_id = _finished_job(sessions, store)
    url = path.format(jobs=JOBS, id=job_id)
    first = client.get(url)
    tag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "private, no-cache"
    again = client.get(url, headers={"If-None-Match": tag})
    assert again.status_code == 304
    assert again.data == b""
    assert again.headers["ETag"] == tag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_the_etag_changes_when_the_job_does(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING)
    tag = client.get(f"{JOBS}/{job_id}").headers["ETag"]
    insert_metrics(sessions, job_id, [_test(1)])
    changed = client.get(f"{JOBS}/{job_id}", headers={"If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != tag
    assert changed.get_json()["test_metrics"][0]["epoch"] == 1


def test_metric_pages_follow_next_after_step_to_the_end(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING)
    insert_metrics(sessions, job_id, [_train(s) for s in range(1, 26)] + [_test(1)])
    steps, after, pages = [], None, 0
    while True:
        query = f"?limit=10{'' if after is None else f'&after_step={after}'}"
        body = client.get(f"{JOBS}/{job_id}/metrics{query}").get_json()
        steps += [p["step"] for p in body["train"]]
        pages += 1
        after = body["next_after_step"]
        if after is None:
            break
    assert steps == list(range(1, 26))
    assert pages == 3
    later = client.get(f"{JOBS}/{job_id}/metrics?after_step=20").get_json()
    assert [p["step"] for p in later["train"]] == [21, 22, 23, 24, 25]
    assert [p["step"] for p in later["test"]] == [938]
    assert client.get(f"{JOBS}/{job_id}/metrics?after_step=938").get_json()["test"] == []


def test_max_points_thins_the_train_series_keeping_both_ends(
    client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING)
    insert_metrics(sessions, job_id, [_train(s) for s in range(1, 1001)])
    body = client.get(f"{JOBS}/{job_id}/metrics?max_points=50").get_json()
    steps = [p["step"] for p in body["train"]]
    assert 40 <= len(steps) <= 51
    assert steps[0] == 1 and steps[-1] == 1000
    assert steps == sorted(steps)
    assert body["next_after_step"] is None
    few = client.get(f"{JOBS}/{job_id}/metrics?max_points=5000").get_json()
    assert len(few["train"]) == 1000


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("max_points=1", "max_points"), ("after_step=-1", "after_step"),
     ("limit=10001", "limit"), ("bogus=1", "bogus")],
)  # fmt: skip
def test_bad_metric_queries_name_the_field(
    client: FlaskClient, sessions: sessionmaker[Session], query: str, field: str
) -> None:
    job_id = insert_job(sessions, status=JobStatus.RUNNING)
    response = client.get(f"{JOBS}/{job_id}/metrics?{query}")
    assert response.status_code == 422
    assert field in response.get_data(as_text=True)


def test_concurrent_reads_reuse_the_pools_connections_instead_of_opening_new_ones(
    tmp_path: Path, migrated_postgres: str, publisher: RecordingPublisher
) -> None:
    """Bursts of as many callers as the pool keeps: each request takes a kept connection. Past
    the pool's size each burst would open connections and close them once it is over."""
    callers = 8
    empty_tables(migrated_postgres)
    app = create_app(
        make_settings(tmp_path, migrated_postgres, db_pool_size=callers), publish=publisher
    )
    engine = app.extensions[ENGINE_KEY]
    opened: list[object] = []
    event.listen(engine, "connect", lambda conn, _record: opened.append(conn))
    sessions = app.extensions[SESSIONS_KEY]
    client = client_as(app, add_user(sessions, "admin", admin=True))
    running = insert_job(sessions, status=JobStatus.RUNNING)

    @app.before_request
    def hold_a_connection_a_while() -> None:  # every caller's request in flight at once
        get_session().connection()
        time.sleep(0.01)

    together = threading.Barrier(callers)

    def poll() -> None:  # a burst of every caller at once, then none, ten times over
        for _ in range(10):
            together.wait(timeout=30)
            assert client.get(f"{JOBS}/{running}").status_code == 200

    with ThreadPoolExecutor(callers) as pool:
        for future in [pool.submit(poll) for _ in range(callers)]:
            future.result()
    assert 1 <= len(opened) <= callers, f"{len(opened)} connections for {callers} callers"
    engine.dispose()
