"""The worker registry on real SQLite and PostgreSQL: beats, liveness, queue positions."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import workers
from shared.models import Job, JobStatus, Worker, utcnow
from shared.workers import WorkerInfo

Factory = sessionmaker[Session]


def info(queues: tuple[str, ...] = ("cpu",), heartbeat: float = 1.0) -> WorkerInfo:
    """A worker's self-description with a fresh id."""
    return WorkerInfo(workers.new_worker_id(), "celery@host", "host", 123, queues, 1, heartbeat)


def age(factory: Factory, worker_id: str, seconds: float) -> None:
    """Pretend the worker's last beat was ``seconds`` ago."""
    with factory() as session, session.begin():
        session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(last_seen_at=utcnow() - timedelta(seconds=seconds))
        )


def add_jobs(factory: Factory, queue: str, n: int) -> list[str]:
    """Insert ``n`` queued jobs on ``queue``, one second apart, oldest first."""
    now = utcnow()
    jobs = [
        Job(hyperparameters={}, queue=queue, queued_at=now - timedelta(seconds=n - i))
        for i in range(n)
    ]
    with factory() as session, session.begin():
        session.add_all(jobs)
    return [job.id for job in jobs]


def statuses(factory: Factory, ids: list[str]) -> dict[str, workers.QueueStatus]:
    with factory() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(ids))).all()
        return workers.queue_status(session, jobs)


def test_a_beat_registers_then_refreshes_one_row(factory: Factory) -> None:
    me = info(("cpu", "maintenance"))
    workers.beat(factory, me)
    age(factory, me.id, 60)
    workers.beat(factory, me)
    with factory() as session:
        rows = session.scalars(select(Worker)).all()
        live = workers.live_workers(session)
    assert [(r.id, r.queues, r.pid) for r in rows] == [(me.id, "cpu,maintenance", 123)]
    assert [w.id for w in live] == [me.id]


def test_a_worker_is_live_for_three_of_its_beats_and_gone_once_removed(factory: Factory) -> None:
    fresh, late, dead, leaving = info(), info(), info(), info()
    for worker in (fresh, late, dead, leaving):
        workers.beat(factory, worker)
    age(factory, late.id, 2.5)  # missed two beats of 1 s: still live
    age(factory, dead.id, 3.5)  # missed more than three
    workers.remove(factory, leaving.id)
    with factory() as session:
        live = {w.id for w in workers.live_workers(session)}
    assert live == {fresh.id, late.id}


def test_rows_of_long_dead_workers_are_forgotten_at_the_next_beat(factory: Factory) -> None:
    ghost, alive = info(), info()
    workers.beat(factory, ghost)
    age(factory, ghost.id, workers.FORGET_AFTER.total_seconds() + 1)
    workers.beat(factory, alive)
    with factory() as session:
        assert session.scalars(select(Worker.id)).all() == [alive.id]


def test_queued_jobs_know_their_place_and_who_serves_their_queue(factory: Factory) -> None:
    cpu = add_jobs(factory, "cpu", 3)
    gpu = add_jobs(factory, "gpu", 2)
    workers.beat(factory, info(("cpu",)))
    workers.beat(factory, info(("cpu", "maintenance")))
    workers.beat(factory, info(("maintenance",)))
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == cpu[0]).values(status=JobStatus.RUNNING))
    found = statuses(factory, cpu + gpu)
    assert cpu[0] not in found  # running: no queue status
    assert [(found[i].position, found[i].live_workers) for i in cpu[1:]] == [(1, 2), (2, 2)]
    assert found[cpu[1]].message is None
    assert [found[i].position for i in gpu] == [1, 2]
    assert {found[i].live_workers for i in gpu} == {0}
    message = found[gpu[0]].message or ""
    assert "no live worker serves the 'gpu' queue" in message
    assert "mnistq worker --queues gpu" in message


def test_nothing_queued_needs_no_registry_query(factory: Factory) -> None:
    assert statuses(factory, []) == {}
