"""The API side of sweeps: validate a search space, create, list, look up, cancel, summarize.

A sweep is a row; its trials are ordinary jobs with ``sweep_id`` and ``trial_number``. The
controller (``worker.sweeper``) adds trials under the sweep's lease (``shared.sweep_lease``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import idempotency
from shared.idempotency import request_digest, scoped_key
from shared.jobs import FieldError, InvalidJobRequest, Loc
from shared.lease import _changed_one
from shared.models import Job, JobStatus, Metric, Sweep, SweepStatus, utcnow
from shared.schemas import JOB_ID_PATTERN, Hyperparameters
from shared.sweep_schemas import MAX_TRIALS, ParameterSpec, SweepCreate

_SWEEP_ID = re.compile(JOB_ID_PATTERN)
# A range's values that the job schema must accept: both ends (bounds are intervals).
_RANGE_ENDS = ("min", "max")


class SweepNotFound(LookupError):
    """No sweep has this id (or the caller may not see it)."""


class SweepConflict(Exception):
    """The sweep's state does not allow the request, e.g. cancelling a finished sweep."""


class InvalidSweepRequest(InvalidJobRequest):
    """A well-formed sweep whose search space the job schema does not accept."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        ValueError.__init__(
            self, "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors)
        )
        self.errors = list(errors)


# --- validation: the search space against the job schema itself ----------------------------


def check_space(body: SweepCreate) -> int:
    """Raise InvalidSweepRequest naming each bad parameter; return the sweep's max_trials."""
    errors: list[FieldError] = []
    base = body.base.hyperparameters.model_dump(mode="json")
    for name, spec in body.parameters.items():
        errors += _parameter_errors(name, spec, base)
    if not errors:
        errors += _budget_errors(body)
    if errors:
        raise InvalidSweepRequest(errors)
    return resolved_max_trials(body)


def _parameter_errors(name: str, spec: ParameterSpec, base: dict[str, Any]) -> list[FieldError]:
    where: Loc = ("parameters", name)
    field = Hyperparameters.model_fields.get(name)
    if field is None:
        known = ", ".join(Hyperparameters.model_fields)
        return [FieldError(where, f"not a hyperparameter of a job; one of: {known}")]
    if field.annotation is int and spec.distribution in ("uniform", "log_uniform_values"):
        return [FieldError((*where, "distribution"), "an integer: use int_uniform or values")]
    errors = []
    for loc, value in _candidates(spec):
        message = _rejected(name, value, base)
        if message is not None:
            errors.append(FieldError((*where, *loc), message))
    return errors


def _candidates(spec: ParameterSpec) -> list[tuple[Loc, Any]]:
    """Each value a job could get from ``spec``, with where it is written in the request."""
    if spec.distribution == "constant":
        return [(("value",), spec.value)]
    if spec.distribution == "categorical":
        return [(("values", i), v) for i, v in enumerate(spec.values or [])]
    return [((end,), getattr(spec, end)) for end in _RANGE_ENDS]


def _rejected(name: str, value: Any, base: dict[str, Any]) -> str | None:
    """The job schema's own message when a job with ``name=value`` would be invalid."""
    try:
        Hyperparameters.model_validate({**base, name: value})
    except ValidationError as exc:
        mine = [e for e in exc.errors() if tuple(e["loc"])[:1] == (name,)] or exc.errors()
        return str(mine[0]["msg"])
    return None


def _budget_errors(body: SweepCreate) -> list[FieldError]:
    asked = body.budget.max_trials
    if body.method != "grid":
        if asked is None:
            return [FieldError(("budget", "max_trials"), f"required for a {body.method} search")]
        return []
    size = grid_size(body.parameters)
    if size is None:
        bad = [n for n, s in body.parameters.items() if s.choices() is None]
        return [
            FieldError(("parameters", n), "a grid needs finite choices: values, value, "
                       "int_uniform or a uniform with q")
            for n in bad
        ]  # fmt: skip
    if size > MAX_TRIALS:
        return [FieldError(("parameters",), f"the grid has {size} cells, at most {MAX_TRIALS}")]
    if asked is not None and asked != size:
        return [FieldError(("budget", "max_trials"), f"a grid runs each of its {size} cells once")]
    return []


def grid_size(parameters: dict[str, ParameterSpec]) -> int | None:
    """The number of cells of the grid over ``parameters``; None if one is not finite."""
    axes = [spec.choices() for spec in parameters.values()]
    if any(axis is None for axis in axes):
        return None
    return math.prod(len(axis or []) for axis in axes)


def resolved_max_trials(body: SweepCreate) -> int:
    """max_trials as the sweep runs it: a grid's is its size."""
    if body.method == "grid":
        return grid_size(body.parameters) or 0
    return body.budget.max_trials or 0


# --- create, look up, list, cancel ---------------------------------------------------------


def create_sweep(
    session: Session, body: SweepCreate, *, idempotency_key: str | None, owner_id: int | None
) -> tuple[Sweep, bool]:
    """Validate and store a running sweep; (sweep, True), or (earlier sweep, False) on a replay."""
    digest, key = request_digest(body), scoped_key(idempotency_key, owner_id)
    if (replayed := idempotency.earlier(session, Sweep, key, digest)) is not None:
        return replayed, False
    max_trials = check_space(body)
    sweep = Sweep(
        name=body.name,
        status=SweepStatus.RUNNING,
        method=body.method,
        spec=body.model_dump(mode="json", exclude={"name", "method"}, exclude_none=True),
        max_trials=max_trials,
        max_concurrent=body.budget.max_concurrent,
        max_failed=body.budget.max_failed,
        owner_id=owner_id,
        idempotency_key=key,
        request_hash=digest,
    )
    return idempotency.store(session, sweep, key, digest)


def get_sweep(session: Session, sweep_id: str, *, owner_id: int | None = None) -> Sweep:
    """The sweep ``sweep_id``; SweepNotFound if there is none or ``owner_id`` may not see it."""
    sweep = session.get(Sweep, sweep_id) if _SWEEP_ID.fullmatch(sweep_id) else None
    if sweep is None or (owner_id is not None and sweep.owner_id != owner_id):
        raise SweepNotFound(f"no sweep with id {sweep_id!r}")
    return sweep


def list_sweeps(
    session: Session,
    *,
    statuses: Sequence[str] | None = None,
    limit: int = 50,
    owner_id: int | None = None,
) -> list[Sweep]:
    """Sweeps newest first; only ``owner_id``'s unless it is None (an admin)."""
    stmt = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)
    if owner_id is not None:
        stmt = stmt.where(Sweep.owner_id == owner_id)
    if statuses:
        stmt = stmt.where(Sweep.status.in_(statuses))
    return list(session.scalars(stmt))


def request_cancel(session: Session, sweep_id: str, *, owner_id: int | None = None) -> Sweep:
    """End a running sweep as cancelled: queued trials now, running ones at their heartbeat."""
    get_sweep(session, sweep_id, owner_id=owner_id)
    # The sweep row first: on PostgreSQL its lock orders this against a controller adding a
    # trial, so a trial committed just before is cancelled below and none comes after.
    ended = _changed_one(
        session,
        update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.status == SweepStatus.RUNNING)
        .values(status=SweepStatus.CANCELLED, finished_at=utcnow(), lease_token=None),
    )
    if ended:
        stop_trials(session, sweep_id)
    session.commit()
    sweep = session.get(Sweep, sweep_id, populate_existing=True)
    if sweep is None:
        raise SweepNotFound(f"no sweep with id {sweep_id!r}")
    if not ended:
        raise SweepConflict(
            f"sweep {sweep_id} is {sweep.status}; only a running sweep can be cancelled"
        )
    return sweep


def stop_trials(session: Session, sweep_id: str) -> None:
    """Cancel the sweep's queued trials and ask its running ones to stop (in ``session``)."""
    now = utcnow()
    for in_status, values in (
        (JobStatus.QUEUED, {"status": JobStatus.CANCELLED, "finished_at": now}),
        (JobStatus.RUNNING, {}),
    ):
        session.execute(
            update(Job)
            .where(Job.sweep_id == sweep_id, Job.status == in_status)
            .values(cancel_requested=True, **values)
            .execution_options(synchronize_session=False)
        )


# --- trials: their values, the best, the counts ---------------------------------------------


def trials_of(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's trial jobs by trial number."""
    stmt = select(Job).where(Job.sweep_id == sweep_id).order_by(Job.trial_number)
    return list(session.scalars(stmt))


def searched(spec: dict[str, Any]) -> list[str]:
    """The names of a stored sweep's parameters that vary (constants left out)."""
    return [n for n, raw in spec["parameters"].items() if raw.get("distribution") != "constant"]


def trials_by_sweep(session: Session, sweep_ids: Sequence[str]) -> dict[str, list[Job]]:
    """The trial jobs of each sweep, by trial number, in one query."""
    found: dict[str, list[Job]] = {sweep_id: [] for sweep_id in sweep_ids}
    if not sweep_ids:
        return found
    stmt = select(Job).where(Job.sweep_id.in_(sweep_ids)).order_by(Job.trial_number)
    for job in session.scalars(stmt):
        found[job.sweep_id or ""].append(job)
    return found


def trial_params(sweep: Sweep, job: Job) -> dict[str, Any]:
    """The values the search chose for ``job`` (its searched hyperparameters)."""
    return {name: job.hyperparameters.get(name) for name in searched(sweep.spec)}


def metric_of(sweep: Sweep) -> tuple[str, bool]:
    """(metric name, True when larger is better)."""
    metric = sweep.spec["metric"]
    return metric["name"], metric["goal"] == "maximize"


def trial_value(sweep: Sweep, job: Job) -> float | None:
    """A trial's final metric: only a trial that succeeded has one."""
    if job.status != JobStatus.SUCCEEDED:
        return None
    name, _ = metric_of(sweep)
    value = job.test_accuracy if name == "test_accuracy" else job.test_loss
    return None if value is None or not math.isfinite(value) else value


def epoch_value(sweep: Sweep, metric: Metric) -> float | None:
    """The sweep's metric in one per-epoch test row."""
    name, _ = metric_of(sweep)
    return metric.accuracy if name == "test_accuracy" else metric.loss


def ranked(sweep: Sweep, jobs: Iterable[Job]) -> list[Job]:
    """Trials best first; those without a value last, newest first."""
    _, maximize = metric_of(sweep)
    sign = -1.0 if maximize else 1.0

    def key(job: Job) -> tuple[int, float, int]:
        value = trial_value(sweep, job)
        number = job.trial_number or 0
        return (0, sign * value, number) if value is not None else (1, 0.0, -number)

    return sorted(jobs, key=key)


@dataclass(frozen=True)
class Best:
    """The best finished trial of a sweep."""

    job: Job
    value: float


def best_trial(sweep: Sweep, jobs: Iterable[Job]) -> Best | None:
    """The succeeded trial with the best value, the lowest trial number among equals."""
    order = ranked(sweep, jobs)
    value = trial_value(sweep, order[0]) if order else None
    return Best(order[0], value) if value is not None else None


def counts(jobs: Iterable[Job]) -> dict[str, int]:
    """How many trials are in each job state."""
    found = {status.value: 0 for status in JobStatus}
    for job in jobs:
        found[job.status] += 1
    return found
