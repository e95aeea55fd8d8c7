"""shared.jobs under concurrency, on PostgreSQL where requests really run in parallel."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, update

from shared.celery_app import BrokerUnavailable
from shared.db import make_engine, make_session_factory
from shared.jobs import create_job, request_cancel
from shared.lease import Claimant, Lease, claim_next, publish_stamped
from shared.models import Job
from shared.schemas import JobCreate
from tests.api.conftest import empty_tables


def test_racing_submissions_with_one_key_make_one_job(migrated_postgres: str) -> None:
    empty_tables(migrated_postgres)
    engine = make_engine(migrated_postgres)
    sessions = make_session_factory(engine)
    barrier = threading.Barrier(4)

    def submit(_: int) -> tuple[str, bool]:
        with sessions() as session:
            barrier.wait()
            job, created = create_job(
                session, JobCreate.model_validate({"name": "race"}), idempotency_key="same"
            )
            return job.id, created

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(submit, range(4)))
        with sessions() as session:
            count = session.scalar(select(func.count()).select_from(Job))
    finally:
        engine.dispose()
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert count == 1


def test_cancel_after_a_claim_flags_the_job_instead(migrated_postgres: str) -> None:
    """The session still holds the job as queued; the conditional UPDATE sees it running."""
    empty_tables(migrated_postgres)
    engine = make_engine(migrated_postgres)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            job, _ = create_job(session, JobCreate.model_validate({}), idempotency_key=None)
            # What a worker's claim does: the row is running before the cancel arrives.
            session.execute(update(Job).where(Job.id == job.id).values(status="running"))
            session.commit()
            cancelled = request_cancel(session, job.id)
    finally:
        engine.dispose()
    assert (cancelled.status, cancelled.cancel_requested) == ("running", True)


def test_a_worker_woken_by_the_message_can_claim_the_job_at_once(migrated_postgres: str) -> None:
    """The stamp is committed before the message goes out: the publisher holds no lock on
    the row that a woken worker's claim (SKIP LOCKED) would pass by; a failed send takes
    the stamp back, for the reaper's next pass."""
    empty_tables(migrated_postgres)
    engine = make_engine(migrated_postgres)
    sessions = make_session_factory(engine)
    claims: list[Lease | None] = []
    stamps: list[object] = []

    def woken_worker(job_id: str, queue: str) -> None:
        # Another connection, as a worker's child has, while the publisher's call is open.
        with sessions() as other:
            stamps.append(other.scalar(select(Job.published_at).where(Job.id == job_id)))
        claims.append(claim_next(sessions, [queue], claimant=Claimant("w"), lease_seconds=30))

    def broker_down(job_id: str, queue: str) -> None:
        raise BrokerUnavailable("redis: connection refused")

    try:
        with sessions() as session:
            job, _ = create_job(session, JobCreate.model_validate({}), idempotency_key=None)
            publish_stamped(sessions, job.id, job.queue, woken_worker)
            other, _ = create_job(session, JobCreate.model_validate({}), idempotency_key=None)
            with pytest.raises(BrokerUnavailable):
                publish_stamped(sessions, other.id, other.queue, broker_down)
            left = session.scalar(select(Job.published_at).where(Job.id == other.id))
    finally:
        engine.dispose()
    [claimed] = claims
    assert stamps[0] is not None and claimed is not None and claimed.job_id == job.id
    assert left is None
