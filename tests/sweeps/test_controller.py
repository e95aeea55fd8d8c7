"""The sweep controller on SQLite: what each pass does with the trial jobs workers leave.

The workers are played by updates to the trial rows (the state a real worker writes); the
real worker processes run in tests/integration/test_sweeps.py.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import lease as leases
from shared import sweep_lease
from shared.config import Settings
from shared.models import (
    EventKind,
    Job,
    JobEvent,
    JobStatus,
    Metric,
    Sweep,
    SweepStatus,
    utcnow,
)
from shared.sweep_schemas import SweepCreate
from shared.sweeps import create_sweep
from tests.api.conftest import RecordingPublisher
from worker import sweeper

Factory = sessionmaker[Session]
SETTINGS = Settings(lease_seconds=30)
GRID: dict[str, Any] = {
    "method": "grid",
    "parameters": {
        "learning_rate": {"values": [0.01, 0.05]},
        "momentum": {"values": [0.5, 0.9]},
        "n_epochs": {"value": 1},
    },
    "budget": {"max_concurrent": 2, "max_failed": 1},
}
RANDOM: dict[str, Any] = {
    "method": "random",
    "parameters": {
        "learning_rate": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        "n_epochs": {"value": 3},
    },
    "budget": {"max_trials": 9, "max_concurrent": 9},
    "early_terminate": {"type": "asha", "min_epochs": 1, "eta": 3},
    "seed": 3,
}


def new_sweep(factory: Factory, body: dict[str, Any]) -> str:
    """Store a sweep as the API does."""
    with factory() as session:
        sweep, _ = create_sweep(
            session, SweepCreate.model_validate(body), idempotency_key=None, owner_id=None
        )
        return sweep.id


def control(factory: Factory, publisher: RecordingPublisher) -> list[str]:
    """One controller pass of this process."""
    return sweeper.control_all(SETTINGS, factory, publisher)


def trials(factory: Factory, sweep_id: str) -> list[Job]:
    """The sweep's trial jobs by number."""
    with factory() as session:
        stmt = select(Job).where(Job.sweep_id == sweep_id).order_by(Job.trial_number)
        return list(session.scalars(stmt))


def sweep_row(factory: Factory, sweep_id: str) -> Sweep:
    """The sweep row as stored now."""
    with factory() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None
        return sweep


_steps = itertools.count(1)


def report(factory: Factory, job_id: str, accuracies: list[float]) -> None:
    """Play a worker that trained epochs 1..n of the job with these test accuracies."""
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.RUNNING))
        session.add_all(
            Metric(job_id=job_id, kind="test", epoch=epoch, step=next(_steps), samples_seen=0,
                   loss=1 - accuracy, accuracy=accuracy, seconds=float(epoch))
            for epoch, accuracy in enumerate(accuracies, start=1)
        )  # fmt: skip


def end(factory: Factory, job_id: str, status: JobStatus, accuracy: float | None = None) -> None:
    """Play a worker ending the job."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow()}
    if status is JobStatus.SUCCEEDED:
        values.update(test_accuracy=accuracy, test_loss=1 - (accuracy or 0))
    if status is JobStatus.FAILED:
        values.update(error_message="RuntimeError: boom")
    with factory() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def params(job: Job) -> tuple[float, float]:
    return job.hyperparameters["learning_rate"], job.hyperparameters["momentum"]


def test_a_grid_runs_every_cell_once_never_more_than_max_concurrent(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)
    control(factory, publisher)
    control(factory, publisher)  # nothing ended: nothing new
    first = trials(factory, sweep_id)
    assert [j.trial_number for j in first] == [0, 1]
    assert publisher.calls == [(j.id, "cpu") for j in first]
    for job, accuracy in zip(first, (0.90, 0.96), strict=True):
        end(factory, job.id, JobStatus.SUCCEEDED, accuracy)
    control(factory, publisher)
    everything = trials(factory, sweep_id)
    assert len(everything) == 4
    for job, accuracy in zip(everything[2:], (0.93, 0.91), strict=True):
        end(factory, job.id, JobStatus.SUCCEEDED, accuracy)
    control(factory, publisher)
    assert {params(j) for j in everything} == set(itertools.product([0.01, 0.05], [0.5, 0.9]))
    assert {j.hyperparameters["n_epochs"] for j in everything} == {1}
    sweep = sweep_row(factory, sweep_id)
    assert (sweep.status, sweep.lease_token) == (SweepStatus.COMPLETED, None)


def test_a_failed_grid_cell_is_run_again_and_too_many_failures_fail_the_sweep(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)  # max_failed 1
    control(factory, publisher)
    zero, one = trials(factory, sweep_id)
    end(factory, zero.id, JobStatus.FAILED)
    end(factory, one.id, JobStatus.SUCCEEDED, 0.9)
    for _ in range(3):
        control(factory, publisher)
        for job in trials(factory, sweep_id):
            if job.status == JobStatus.QUEUED and job.trial_number != 4:
                end(factory, job.id, JobStatus.SUCCEEDED, 0.9)
    everything = trials(factory, sweep_id)
    assert len(everything) == 5
    assert params(everything[4]) == params(zero)  # the failed cell, not a lost one
    end(factory, everything[4].id, JobStatus.FAILED)
    control(factory, publisher)
    sweep = sweep_row(factory, sweep_id)
    assert sweep.status == SweepStatus.FAILED
    assert sweep.error_message is not None
    assert "2 trials failed, more than max_failed=1" in sweep.error_message
    assert "trial 4" in sweep.error_message and "RuntimeError: boom" in sweep.error_message


def test_asha_prunes_running_trials_below_the_rung_and_keeps_the_good_ones(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, RANDOM)
    control(factory, publisher)
    jobs = trials(factory, sweep_id)
    assert len(jobs) == 9
    done = {0: [0.95, 0.97, 0.98], 1: [0.94, 0.96, 0.97], 2: [0.93, 0.95, 0.96]}
    for number, accuracies in done.items():
        report(factory, jobs[number].id, accuracies)
        end(factory, jobs[number].id, JobStatus.SUCCEEDED, accuracies[-1])
    report(factory, jobs[3].id, [0.60])  # far below the rung's best third
    report(factory, jobs[4].id, [0.99])  # the best at rung 1
    control(factory, publisher)
    flagged = {j.trial_number: j.prune_requested for j in trials(factory, sweep_id)}
    assert flagged[3] is True
    assert flagged[4] is False
    assert not any(flagged[n] for n in (0, 1, 2, 5, 6, 7, 8))


def test_the_median_rule_prunes_a_trial_below_the_median_of_finished_ones(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    body = RANDOM | {"early_terminate": {"type": "median", "min_epochs": 1}}
    sweep_id = new_sweep(factory, body)
    control(factory, publisher)
    jobs = trials(factory, sweep_id)
    for number in (0, 1, 2):
        report(factory, jobs[number].id, [0.9, 0.95, 0.97])
        end(factory, jobs[number].id, JobStatus.SUCCEEDED, 0.97)
    report(factory, jobs[3].id, [0.5])
    report(factory, jobs[4].id, [0.93])
    control(factory, publisher)
    flagged = {j.trial_number: j.prune_requested for j in trials(factory, sweep_id)}
    assert (flagged[3], flagged[4]) == (True, False)


def test_a_pruned_trial_counts_toward_the_budget_and_the_best_is_a_finished_one(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    body = RANDOM | {"budget": {"max_trials": 2, "max_concurrent": 2}}
    sweep_id = new_sweep(factory, body)
    control(factory, publisher)
    kept, cut = trials(factory, sweep_id)
    report(factory, kept.id, [0.9, 0.95, 0.97])
    end(factory, kept.id, JobStatus.SUCCEEDED, 0.97)
    report(factory, cut.id, [0.99])
    end(factory, cut.id, JobStatus.PRUNED)
    control(factory, publisher)
    assert sweep_row(factory, sweep_id).status == SweepStatus.COMPLETED
    assert len(trials(factory, sweep_id)) == 2


def test_one_controller_at_a_time_and_the_next_takes_over_an_expired_lease(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)
    mine = sweep_lease.take(factory, sweep_id, token="a", controller="a:1", lease_seconds=30)
    assert mine is not None
    assert (
        sweep_lease.take(factory, sweep_id, token="b", controller="b:2", lease_seconds=30) is None
    )
    assert control(factory, publisher) == []  # this process is neither a nor b
    with factory() as session, session.begin():
        past = utcnow() - timedelta(seconds=1)
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(lease_expires_at=past))
    assert control(factory, publisher) == [sweep_id]
    assert sweep_row(factory, sweep_id).controller == sweeper.controller_name()
    # The old holder, back from a pause, is fenced out: it adds nothing.
    job = sweeper.trial_job(
        sweep_row(factory, sweep_id), 7, {"learning_rate": 0.01, "momentum": 0.5}
    )
    assert sweep_lease.add_trial(factory, mine, job) is False
    assert [j.trial_number for j in trials(factory, sweep_id)] == [0, 1]


def test_a_trial_number_is_never_taken_twice(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)
    control(factory, publisher)
    lease = sweep_lease.take(
        factory, sweep_id, token=sweeper.process_token(), controller="x", lease_seconds=30
    )
    assert lease is not None
    again = sweeper.trial_job(
        sweep_row(factory, sweep_id), 1, {"learning_rate": 0.05, "momentum": 0.9}
    )
    assert sweep_lease.add_trial(factory, lease, again) is False
    assert len(trials(factory, sweep_id)) == 2


def test_a_cancelled_sweep_gets_no_new_trials(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    from shared.sweeps import request_cancel

    sweep_id = new_sweep(factory, GRID)
    control(factory, publisher)
    with factory() as session:
        request_cancel(session, sweep_id)
    for job in trials(factory, sweep_id):
        end(factory, job.id, JobStatus.CANCELLED)
    assert control(factory, publisher) == []
    assert len(trials(factory, sweep_id)) == 2


def test_a_broker_outage_leaves_trials_queued_for_the_reaper(factory: Factory) -> None:
    down = RecordingPublisher(down=True)
    sweep_id = new_sweep(factory, GRID)
    control(factory, down)
    jobs = trials(factory, sweep_id)
    assert [(j.status, j.published_at) for j in jobs] == [(JobStatus.QUEUED, None)] * 2


def test_a_prune_request_reaches_the_heartbeat_and_an_expired_one_ends_pruned(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)
    control(factory, publisher)
    claimant = leases.Claimant("h")
    lease = leases.claim_next(factory, ["cpu"], claimant=claimant, lease_seconds=30)
    other = leases.claim_next(factory, ["cpu"], claimant=claimant, lease_seconds=-1)  # expired
    assert lease is not None and other is not None
    holder = sweep_lease.take(
        factory, sweep_id, token=sweeper.process_token(), controller="x", lease_seconds=30
    )
    assert holder is not None
    assert sweep_lease.prune(factory, holder, lease.job_id)
    assert sweep_lease.prune(factory, holder, other.job_id)
    beat = leases.heartbeat(factory, lease, 30)
    assert (beat.prune_requested, beat.ok) == (True, False)
    assert leases.finish(factory, lease, JobStatus.PRUNED)
    expired = leases.requeue_expired(factory, max_attempts=3)
    assert expired.pruned == [other.job_id]
    assert [j.status for j in trials(factory, sweep_id)] == [JobStatus.PRUNED] * 2
    with factory() as session:
        lines = session.scalars(
            select(JobEvent.message).where(
                JobEvent.job_id == other.job_id, JobEvent.kind == EventKind.LOG
            )
        ).all()
    assert lines[-1] == (
        "lease lost: the worker stopped renewing it (killed, frozen or cut off); "
        "its sweep had stopped it: pruned"
    )


@pytest.mark.parametrize("method", ["random", "tpe"])
def test_random_and_tpe_sweeps_ask_distinct_values_within_bounds(
    factory: Factory, publisher: RecordingPublisher, method: str
) -> None:
    body = RANDOM | {"method": method, "budget": {"max_trials": 6, "max_concurrent": 2}}
    body["parameters"] = RANDOM["parameters"] | {
        "batch_size_train": {"distribution": "int_uniform", "min": 32, "max": 256, "q": 32},
        "momentum": {"distribution": "q_uniform", "min": 0.1, "max": 0.9, "q": 0.1},
    }
    sweep_id = new_sweep(factory, body)
    for _ in range(3):
        control(factory, publisher)
        for job in trials(factory, sweep_id):
            if job.status == JobStatus.QUEUED:
                end(factory, job.id, JobStatus.SUCCEEDED, job.hyperparameters["learning_rate"])
    control(factory, publisher)
    jobs = trials(factory, sweep_id)
    assert len(jobs) == 6 and sweep_row(factory, sweep_id).status == SweepStatus.COMPLETED
    rates = [j.hyperparameters["learning_rate"] for j in jobs]
    assert len(set(rates)) == 6 and all(0.001 <= r <= 0.1 for r in rates)
    assert all(j.hyperparameters["batch_size_train"] % 32 == 0 for j in jobs)
    assert all(round(j.hyperparameters["momentum"] * 10, 6).is_integer() for j in jobs)


def test_a_sweep_the_search_cannot_go_on_with_ends_failed_with_the_reason(
    factory: Factory, publisher: RecordingPublisher
) -> None:
    sweep_id = new_sweep(factory, GRID)
    spec = sweep_row(factory, sweep_id).spec
    broken = spec | {"parameters": {"momentum": {"distribution": "normal"}}}
    with factory() as session, session.begin():
        session.execute(update(Sweep).where(Sweep.id == sweep_id).values(spec=broken))
    control(factory, publisher)
    sweep = sweep_row(factory, sweep_id)
    assert sweep.status == SweepStatus.FAILED
    assert (sweep.error_message or "").startswith("controller error: ValidationError")
    assert control(factory, publisher) == []  # ended once, not retried every pass
