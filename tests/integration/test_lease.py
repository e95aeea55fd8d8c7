"""The lease protocol on real SQLite and PostgreSQL: claim, heartbeat, fencing, reaper queries."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import lease as leases
from shared.lease import Claimant, Lease, MetricRecord, ProgressUpdate
from shared.models import Artifact, Job, JobStatus, Metric, User, Worker, WorkerState, utcnow

Factory = sessionmaker[Session]


def add_job(factory: Factory, **values: object) -> str:
    """Insert a queued job row; returns its id."""
    job = Job(hyperparameters={"n_epochs": 1}, **values)
    with factory() as session, session.begin():
        session.add(job)
    return job.id


def get(factory: Factory, job_id: str) -> Job:
    """The job row as it is now."""
    with factory() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def expire(factory: Factory, job_id: str) -> None:
    """Pretend the worker died: its lease ran out a minute ago."""
    with factory() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(60))
        )


CLAIMANT = Claimant(hostname="host-a", worker_id="w" * 32, pid=4242)


def claim(factory: Factory, job_id: str | None = None, queue: str = "cpu") -> Lease | None:
    """Claim the best queued job of ``queue``; when ``job_id`` is given it must be that one."""
    lease = leases.claim_next(factory, [queue], claimant=CLAIMANT, lease_seconds=30)
    assert lease is None or job_id is None or lease.job_id == job_id
    return lease


PROGRESS = ProgressUpdate(1, 2, 10, 938, 640, 120000, 1000.0, 0.5)
POINT = MetricRecord("train", 1, 11, 640, 0.5, None, 1.0)


def test_claim_runs_a_queued_job_once(factory: Factory) -> None:
    job_id = add_job(factory)
    first = claim(factory, job_id)
    assert first is not None and first.job_id == job_id
    assert claim(factory, job_id) is None
    row = get(factory, job_id)
    assert (row.status, row.attempt, row.lease_token) == ("running", 1, first.token)
    assert row.started_at is not None and row.worker_hostname == "host-a"
    assert (row.worker_id, row.worker_pid) == ("w" * 32, 4242)
    assert row.lease_expires_at is not None


def test_claim_of_a_missing_or_finished_job_is_none(factory: Factory) -> None:
    assert claim(factory, "0" * 32) is None
    job_id = add_job(factory, status=JobStatus.CANCELLED)
    assert claim(factory, job_id) is None


def test_heartbeat_renews_and_reports_cancel_and_loss(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    before = get(factory, job_id).lease_expires_at
    beat = leases.heartbeat(factory, lease, 120)
    assert beat.ok and get(factory, job_id).lease_expires_at > before  # type: ignore[operator]
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    assert leases.heartbeat(factory, lease, 120).cancel_requested
    lost = leases.heartbeat(factory, Lease(job_id, "someone-else"), 120)
    assert lost.lost and not lost.ok


def test_fenced_writes_land_while_the_lease_is_ours(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    assert leases.record_progress(factory, lease, PROGRESS, [POINT, POINT])
    assert leases.record_artifact(
        factory, lease, name="model.pth", kind="model", size=3, sha256="a"
    )
    assert leases.record_artifact(
        factory, lease, name="model.pth", kind="model", size=5, sha256="b"
    )
    assert leases.finish(
        factory, lease, JobStatus.SUCCEEDED, test_loss=0.1, test_accuracy=0.97, metrics=[POINT]
    )
    row = get(factory, job_id)
    assert (row.status, row.step, row.samples_seen, row.test_accuracy) == (
        "succeeded",
        10,
        640,
        0.97,
    )
    assert row.lease_token is None and row.finished_at is not None
    with factory() as session:
        assert len(session.scalars(select(Metric).where(Metric.job_id == job_id)).all()) == 3
        artifacts = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all()
    assert [(a.name, a.size, a.sha256) for a in artifacts] == [("model.pth", 5, "b")]


def test_a_worker_whose_lease_was_taken_writes_nothing(factory: Factory) -> None:
    job_id = add_job(factory)
    old = claim(factory, job_id)
    assert old is not None
    expire(factory, job_id)
    assert leases.requeue_expired(factory, max_attempts=3).requeued == [job_id]
    new = claim(factory, job_id)
    assert new is not None
    assert not leases.record_progress(factory, old, PROGRESS, [POINT])
    assert not leases.record_artifact(factory, old, name="x.png", kind="plot", size=1, sha256="c")
    assert not leases.finish(factory, old, JobStatus.FAILED, error_message="stale")
    assert not leases.release(factory, old)
    row = get(factory, job_id)
    assert (row.status, row.attempt, row.lease_token, row.step) == ("running", 2, new.token, 0)
    with factory() as session:
        assert session.scalars(select(Metric).where(Metric.job_id == job_id)).all() == []
        assert session.scalars(select(Artifact).where(Artifact.job_id == job_id)).all() == []


def test_reaper_requeues_fails_and_cancels_expired_jobs(factory: Factory) -> None:
    retry, spent, cancelled, alive = (add_job(factory) for _ in range(4))
    for job_id in (retry, spent, cancelled, alive):
        assert claim(factory, job_id) is not None
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == spent).values(attempt=3))
        session.execute(update(Job).where(Job.id == cancelled).values(cancel_requested=True))
    for job_id in (retry, spent, cancelled):
        expire(factory, job_id)
    done = leases.requeue_expired(factory, max_attempts=3)
    assert (done.requeued, done.failed, done.cancelled) == ([retry], [spent], [cancelled])
    requeued = get(factory, retry)
    assert (requeued.status, requeued.attempt, requeued.published_at) == ("queued", 1, None)
    failed = get(factory, spent)
    assert failed.status == "failed" and "kept dying" in (failed.error_message or "")
    assert get(factory, cancelled).status == "cancelled"
    assert get(factory, alive).status == "running"


def test_two_reapers_at_once_requeue_each_job_once(factory: Factory) -> None:
    ids = [add_job(factory) for _ in range(6)]
    for job_id in ids:
        assert claim(factory, job_id) is not None
        expire(factory, job_id)
    results: list[list[str]] = []
    barrier = threading.Barrier(2)

    def reap() -> None:
        barrier.wait()
        results.append(leases.requeue_expired(factory, max_attempts=3).requeued)

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results[0] + results[1]) == sorted(ids)


def test_release_hands_the_job_back_without_spending_an_attempt(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    assert leases.release(factory, lease)
    row = get(factory, job_id)
    assert (row.status, row.attempt, row.lease_token, row.published_at) == ("queued", 0, None, None)
    again = claim(factory, job_id)
    assert again is not None and get(factory, job_id).attempt == 1


def test_replace_metrics_makes_history_exactly_the_checkpoints(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    assert leases.record_metrics(factory, lease, [POINT, POINT, POINT])
    test_point = MetricRecord("test", 1, 938, 60000, 0.2, 0.95, 9.0)
    assert leases.replace_metrics(factory, lease, [POINT, test_point])
    with factory() as session:
        kinds = session.scalars(
            select(Metric.kind).where(Metric.job_id == job_id).order_by(Metric.id)
        ).all()
    assert kinds == ["train", "test"]


def test_finish_keeps_the_tail_of_a_long_traceback(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    trace = "x" * 20000 + "ValueError: the cause"
    assert leases.finish(
        factory,
        lease,
        JobStatus.FAILED,
        error_message="ValueError: the cause",
        error_traceback=trace,
    )
    row = get(factory, job_id)
    assert row.error_traceback is not None and row.error_traceback.endswith("the cause")
    assert len(row.error_traceback) <= leases.TRACEBACK_TAIL_CHARS + 1


def test_republish_publishes_unpublished_rows_once(factory: Factory) -> None:
    never = add_job(factory, queue="gpu")
    recent = add_job(factory, published_at=utcnow())
    sent: list[tuple[str, str]] = []
    published = leases.republish_due(factory, lambda *a: sent.append(a), grace_seconds=60)
    assert published == [never] and sent == [(never, "gpu")]
    assert get(factory, never).published_at is not None
    assert leases.republish_due(factory, lambda *a: sent.append(a), grace_seconds=60) == []
    assert recent not in [job_id for job_id, _ in sent]


def test_republish_backs_off_for_jobs_waiting_long(factory: Factory) -> None:
    now = utcnow()
    # Queued 2 h ago, last published 10 min ago: waiting, not lost; the next try is due
    # 16 grace periods (16 min at 60 s) after the last, not one grace period after.
    waiting = add_job(
        factory, queued_at=now - timedelta(hours=2), published_at=now - timedelta(minutes=10)
    )
    lost = add_job(
        factory, queued_at=now - timedelta(hours=2), published_at=now - timedelta(minutes=17)
    )
    young = add_job(
        factory, queued_at=now - timedelta(minutes=3), published_at=now - timedelta(minutes=2)
    )
    published = leases.republish_due(factory, lambda *a: None, grace_seconds=60)
    assert sorted(published) == sorted([lost, young])
    assert waiting not in published


def test_republish_keeps_the_row_due_when_publishing_fails(factory: Factory) -> None:
    job_id = add_job(factory)

    def broken(job_id: str, queue: str) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        leases.republish_due(factory, broken, grace_seconds=60)
    assert get(factory, job_id).published_at is None
    assert leases.republish_due(factory, lambda *a: None, grace_seconds=60) == [job_id]


def test_republish_is_bounded_per_pass(factory: Factory) -> None:
    for _ in range(5):
        add_job(factory)
    assert len(leases.republish_due(factory, lambda *a: None, grace_seconds=60, limit=3)) == 3
    assert len(leases.republish_due(factory, lambda *a: None, grace_seconds=60, limit=3)) == 2


def test_claims_take_the_highest_priority_then_the_oldest(factory: Factory) -> None:
    base = utcnow()
    ids = {
        name: add_job(factory, priority=priority, created_at=base + timedelta(seconds=i))
        for i, (name, priority) in enumerate([("a", 0), ("b", 0), ("c", 50), ("d", -10)])
    }
    order = []
    while (lease := claim(factory)) is not None:
        order.append(lease.job_id)
    assert order == [ids["c"], ids["a"], ids["b"], ids["d"]]


def test_a_claim_takes_only_jobs_of_its_queues(factory: Factory) -> None:
    gpu_job = add_job(factory, queue="gpu", priority=100)
    cpu_job = add_job(factory, queue="cpu")
    assert claim(factory, cpu_job, queue="cpu") is not None
    assert claim(factory, queue="cpu") is None
    assert claim(factory, gpu_job, queue="gpu") is not None


def test_a_message_claims_the_best_job_of_its_jobs_queue_unless_its_worker_drains(
    factory: Factory,
) -> None:
    gpu_job = add_job(factory, queue="gpu", priority=100)
    named = add_job(factory, queue="cpu", created_at=utcnow())
    older = add_job(factory, queue="cpu", created_at=utcnow() - timedelta(minutes=1))
    worker = Worker(
        id=CLAIMANT.worker_id, name="w@host-a", hostname="host-a", pid=1, queues="cpu,gpu",
        concurrency=1, heartbeat_seconds=5, state=WorkerState.DRAINING,
    )  # fmt: skip
    with factory() as session, session.begin():
        session.add(worker)

    def message(job_id: str) -> Lease | None:
        return leases.claim_next(
            factory, leases.QueueOf(job_id), claimant=CLAIMANT, lease_seconds=30
        )

    assert message(named) is None  # draining: nothing is taken
    assert {get(factory, i).status for i in (named, older)} == {JobStatus.QUEUED}
    with factory() as session, session.begin():
        session.execute(update(Worker).values(state=WorkerState.LIVE))
    assert message("0" * 32) is None  # no such job, so no queue
    first = message(named)  # the named job's queue, its oldest job first
    assert first is not None and first.job_id == older
    assert get(factory, older).status == JobStatus.RUNNING
    second = message(named)
    assert second is not None and second.job_id == named
    assert message(named) is None  # the cpu queue is empty; the gpu job is not taken
    assert get(factory, gpu_job).status == JobStatus.QUEUED


def test_a_requeued_job_keeps_its_place_in_the_queue(factory: Factory) -> None:
    first = add_job(factory, created_at=utcnow() - timedelta(minutes=5))
    lease = claim(factory, first)
    assert lease is not None
    later = add_job(factory)
    expire(factory, first)
    assert leases.requeue_expired(factory, max_attempts=3).requeued == [first]
    assert claim(factory) == Lease(first, get(factory, first).lease_token or "")
    assert claim(factory, later) is not None


def test_two_claimers_on_fifty_jobs_never_take_the_same_job(factory: Factory) -> None:
    ids = {add_job(factory) for _ in range(50)}
    taken: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def claimer(mine: list[str]) -> None:
        start.wait()
        while (lease := claim(factory)) is not None:
            mine.append(lease.job_id)

    threads = [threading.Thread(target=claimer, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    both = taken[0] + taken[1]
    assert sorted(both) == sorted(ids) and len(set(both)) == 50


def test_requeue_hands_the_job_back_and_counts_the_attempt(factory: Factory) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    assert leases.requeue(factory, lease, max_attempts=2, reason="store down") == "queued"
    row = get(factory, job_id)
    assert (row.status, row.attempt, row.lease_token, row.published_at) == ("queued", 1, None, None)
    # The old lease fences a second try.
    assert leases.requeue(factory, lease, max_attempts=2, reason="store down") is None
    again = claim(factory, job_id)
    assert again is not None
    assert leases.requeue(factory, again, max_attempts=2, reason="store down") == "failed"
    row = get(factory, job_id)
    assert (row.status, row.attempt) == ("failed", 2)
    assert row.error_message == "store down (gave up after 2 attempts)"


@pytest.mark.parametrize(
    ("asked", "ended"), [("cancel_requested", "cancelled"), ("prune_requested", "pruned")]
)
def test_a_job_handed_back_ends_as_asked_when_a_cancel_or_prune_is_pending(
    factory: Factory, asked: str, ended: str
) -> None:
    job_id = add_job(factory)
    lease = claim(factory, job_id)
    assert lease is not None
    with factory.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values({asked: True}))
    assert leases.requeue(factory, lease, max_attempts=3, reason="store down") == ended
    row = get(factory, job_id)
    assert (row.status, row.lease_token) == (ended, None)
    assert row.finished_at is not None


def test_a_running_cap_per_user_lets_other_users_jobs_go_first(factory: Factory) -> None:
    with factory() as session, session.begin():
        session.add_all([User(id=1, name="busy"), User(id=2, name="other")])
    base = utcnow()
    busy = [add_job(factory, owner_id=1, created_at=base + timedelta(seconds=i)) for i in range(3)]
    other = add_job(factory, owner_id=2, created_at=base + timedelta(seconds=10))

    def capped() -> Lease | None:
        return leases.claim_next(
            factory, ["cpu"], claimant=CLAIMANT, lease_seconds=30, max_running_per_user=2
        )

    taken = [lease.job_id for lease in iter(capped, None)]
    assert taken == [busy[0], busy[1], other]  # busy's third waits while two of theirs run
    first = Lease(busy[0], get(factory, busy[0]).lease_token or "")
    assert leases.finish(factory, first, JobStatus.SUCCEEDED)
    assert [lease.job_id for lease in iter(capped, None)] == [busy[2]]
