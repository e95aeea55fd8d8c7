"""The sweep controller: a periodic duty that runs every sweep's search, one holder per sweep.

Each pass, for every running sweep whose lease this process takes: read the trial jobs,
rebuild the Optuna study from them (``worker.search``), end the sweep when its budget is
spent or too many trials failed, ask the pruner about running trials, and submit new trials
as ordinary jobs while fewer than ``max_concurrent`` are queued or running. It runs in the
worker's prefork parent and in ``mnistq up``: Optuna yes, torch never.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import sweep_lease
from shared.celery_app import BrokerUnavailable
from shared.config import Settings
from shared.jobs import epoch_results, new_job
from shared.lease import publish_stamped
from shared.models import Job, JobStatus, Metric, Sweep, SweepStatus
from shared.schemas import Hyperparameters, JobCreate
from shared.sweep_lease import SweepLease
from shared.sweeps import epoch_value, trial_params, trial_value, trials_of

if TYPE_CHECKING:  # Optuna is imported on the first pass that has a sweep to control
    from worker.search import TrialRecord

logger = logging.getLogger(__name__)
Publish = Callable[[str, str], None]

_TOKENS: dict[int, str] = {}


def process_token() -> str:
    """This process's lease token for the sweeps it controls (one per pid, kept across passes)."""
    return _TOKENS.setdefault(os.getpid(), secrets.token_hex(16))


def controller_name() -> str:
    """Who holds a sweep's lease, for people: hostname:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def control_sweeps(settings: Settings, factory: sessionmaker[Session], publish: Publish) -> None:
    """The duty: one pass of the controller over every running sweep (see worker.maintenance)."""
    control_all(settings, factory, publish)


def control_all(settings: Settings, factory: sessionmaker[Session], publish: Publish) -> list[str]:
    """One pass over every running sweep; returns the ids this process controlled."""
    controlled = []
    for sweep_id in sweep_lease.running_sweeps(factory):
        lease = sweep_lease.take(
            factory, sweep_id, token=process_token(), controller=controller_name(),
            lease_seconds=settings.lease_seconds,
        )  # fmt: skip
        if lease is None:
            continue  # another live controller has it
        controlled.append(sweep_id)
        try:
            control_sweep(factory, publish, lease)
        except DBAPIError:
            raise  # the maintenance loop waits for the database
        except Exception as exc:
            # A sweep the search cannot go on with ends with the reason, once, instead of
            # failing again at every pass.
            logger.exception("sweep %s: controller error", sweep_id)
            sweep_lease.finish(
                factory,
                lease,
                SweepStatus.FAILED,
                error=f"controller error: {type(exc).__name__}: {exc}",
            )
    return controlled


@dataclass(frozen=True)
class Snapshot:
    """A sweep and its trials as one read saw them."""

    sweep: Sweep
    trials: list[Job]
    records: list[TrialRecord]

    @property
    def active(self) -> int:
        """Trials queued or running."""
        return sum(1 for r in self.records if not r.status.finished)

    @property
    def failed(self) -> list[Job]:
        """Trials that failed."""
        return [j for j in self.trials if j.status == JobStatus.FAILED]

    @property
    def needed(self) -> int:
        """Trials still to submit: max_trials counts the trials that did not fail."""
        return self.sweep.max_trials - (len(self.trials) - len(self.failed))


def read(factory: sessionmaker[Session], sweep_id: str) -> Snapshot:
    """The sweep, its trials and their per-epoch metric, in three queries."""
    with factory() as session:
        sweep = session.get(Sweep, sweep_id)
        assert sweep is not None  # sweeps are never deleted
        trials = trials_of(session, sweep_id)
        tests = epoch_results(session, [job.id for job in trials])
    return Snapshot(sweep, trials, [record(sweep, job, tests[job.id]) for job in trials])


def record(sweep: Sweep, job: Job, tests: Sequence[Metric]) -> TrialRecord:
    """The study's view of one trial job."""
    from worker.search import TrialRecord

    # Epoch 0 is the untrained net's test: no training to judge a trial by.
    epochs = [
        (m.epoch, v) for m in tests if m.epoch > 0 and (v := epoch_value(sweep, m)) is not None
    ]
    return TrialRecord(
        number=job.trial_number or 0, params=trial_params(sweep, job),
        status=JobStatus(job.status), epochs=epochs, value=trial_value(sweep, job),
    )  # fmt: skip


def control_sweep(factory: sessionmaker[Session], publish: Publish, lease: SweepLease) -> None:
    """One pass of the controller over one sweep whose lease it holds."""
    from worker.search import Search, SearchSpec

    snap = read(factory, lease.sweep_id)
    sweep = snap.sweep
    if len(snap.failed) > sweep.max_failed:
        sweep_lease.finish(factory, lease, SweepStatus.FAILED, error=failure_reason(snap))
        return
    if snap.needed <= 0 and snap.active == 0:
        sweep_lease.finish(factory, lease, SweepStatus.COMPLETED)
        logger.info("sweep %s: completed with %d trials", sweep.id, len(snap.trials))
        return
    search = Search(SearchSpec.of(sweep.method, sweep.spec, sweep.max_trials), snap.records)
    by_number = {job.trial_number: job for job in snap.trials}
    for number in search.to_prune():
        if sweep_lease.prune(factory, lease, by_number[number].id):
            logger.info("sweep %s: pruning trial %d", sweep.id, number)
    room = min(sweep.max_concurrent - snap.active, snap.needed)
    for _ in range(max(0, room)):
        number, params = search.ask()
        if not submit(factory, publish, lease, trial_job(sweep, number, params)):
            return  # fenced out: another controller has the sweep now


def failure_reason(snap: Snapshot) -> str:
    """Why a sweep with too many failed trials ended, naming the last failure."""
    last = max(snap.failed, key=lambda j: j.trial_number or 0)
    return (
        f"{len(snap.failed)} trials failed, more than max_failed={snap.sweep.max_failed}; "
        f"the last, trial {last.trial_number} (job {last.id}): {last.error_message}"
    )


def trial_job(sweep: Sweep, number: int, params: dict[str, object]) -> Job:
    """The job row of trial ``number``: the sweep's base and constants with the chosen values."""
    spec = sweep.spec
    constants = {
        n: p["value"] for n, p in spec["parameters"].items() if p.get("distribution") == "constant"
    }
    try:
        hp = Hyperparameters.model_validate(
            {**spec["base"]["hyperparameters"], **constants, **params}
        )
    except ValidationError as exc:
        raise ValueError(f"trial {number} got values the job schema refuses: {exc}") from exc
    priority = int(spec["base"].get("priority", 0))
    body = JobCreate(
        name=f"{sweep.name or 'sweep'} #{number}", hyperparameters=hp, priority=priority
    )
    job = new_job(body)
    job.owner_id, job.sweep_id, job.trial_number = sweep.owner_id, sweep.id, number
    return job


def submit(factory: sessionmaker[Session], publish: Publish, lease: SweepLease, job: Job) -> bool:
    """Store the trial under the lease, then publish it as the API does; False if fenced out."""
    if not sweep_lease.add_trial(factory, lease, job):
        return False
    try:
        publish_stamped(factory, job.id, job.queue, publish)
    except BrokerUnavailable as exc:
        # The row is stored (outbox): the reaper publishes it once the broker is back.
        logger.warning("sweep trial %s stored but not published: %s", job.id, exc)
        return True
    logger.info("sweep %s: trial %s submitted as job %s", lease.sweep_id, job.trial_number, job.id)
    return True
