"""The API side of the job state machine: create, cancel, mark published, list and look up."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from shared import events, idempotency
from shared.artifacts import ArtifactNotFound, validate_name
from shared.celery_app import queue_for_device
from shared.idempotency import request_digest, scoped_key
from shared.models import Artifact, Job, JobStatus, Metric, utcnow
from shared.schemas import JOB_ID_PATTERN, JobCreate

_JOB_ID = re.compile(JOB_ID_PATTERN)
_CHECKPOINT = re.compile(r"checkpoints/epoch-(\d+)\.pt")

Loc = tuple[str | int, ...]


class JobNotFound(LookupError):
    """No job has this id."""


class JobConflict(Exception):
    """The job is in a state that does not allow the request, e.g. cancelling a finished job."""


class TooManyQueuedJobs(Exception):
    """The user has as many queued jobs as a user may have."""


class InvalidCursor(ValueError):
    """A pagination cursor this API did not hand out."""


@dataclass(frozen=True)
class FieldError:
    """One field of a request that the database, not the schema, showed to be wrong."""

    loc: Loc
    msg: str


class InvalidJobRequest(ValueError):
    """A well-formed request that names something unusable (e.g. a missing checkpoint)."""

    def __init__(self, loc: Loc, msg: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.errors = [FieldError(loc, msg)]


def get_job(session: Session, job_id: str, *, owner_id: int | None = None) -> Job:
    """The job ``job_id``; JobNotFound if there is none (or the id could not be one).

    With ``owner_id`` only that user's jobs exist: another user's job is "not found", so
    its id is not even confirmed. None (admins, workers) sees every job.
    """
    # Checking the shape first keeps NUL bytes and megabyte ids away from the database.
    job = session.get(Job, job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or (owner_id is not None and job.owner_id != owner_id):
        raise JobNotFound(f"no job with id {job_id!r}")
    return job


def create_job(
    session: Session,
    body: JobCreate,
    *,
    idempotency_key: str | None,
    owner_id: int | None = None,
    sees_all: bool = False,
    max_queued: int | None = None,
    published_at: datetime | None = None,
) -> tuple[Job, bool]:
    """Store a queued job and commit; (job, True), or (earlier job, False) on a replayed key.

    ``owner_id`` owns the job and scopes its key; unless ``sees_all`` (an admin) the job
    resumes only from the owner's jobs. ``max_queued`` caps the owner's queued jobs
    (TooManyQueuedJobs); a replay is never refused by it. ``published_at`` stamps the new
    row for a caller that sends its message next (``shared.lease.publish_created``).
    """
    digest, key = request_digest(body), scoped_key(idempotency_key, owner_id)
    if (replayed := idempotency.earlier(session, Job, key, digest)) is not None:
        return replayed, False
    resume_epoch = _resume_epoch(session, body, None if sees_all else owner_id)
    if max_queued is not None and owner_id is not None:
        _check_queue_room(session, owner_id, max_queued)
    job = new_job(body, resume_epoch, key, digest)
    job.owner_id = owner_id
    job.published_at = published_at
    return idempotency.store(session, job, key, digest)


def new_job(
    body: JobCreate, resume_epoch: int | None = None, key: str | None = None, digest: str = ""
) -> Job:
    """The queued row of a validated request, not yet added (sweep trials are made by it too)."""
    hp = body.hyperparameters
    return Job(
        name=body.name,
        status=JobStatus.QUEUED,
        hyperparameters=hp.model_dump(mode="json"),
        device_requested=hp.device,
        queue=queue_for_device(hp.device),
        n_epochs=hp.n_epochs,
        priority=body.priority,
        resume_from_job_id=body.resume_from.job_id if body.resume_from else None,
        resume_from_epoch=resume_epoch,
        idempotency_key=key,
        request_hash=digest or request_digest(body),
    )


def _check_queue_room(session: Session, owner_id: int, max_queued: int) -> None:
    # Two racing submissions may both see room for one more; the cap is a guard against
    # flooding the queue, not an exact quota, so that slack is acceptable.
    stmt = select(func.count(Job.id)).where(
        Job.owner_id == owner_id, Job.status == JobStatus.QUEUED
    )
    queued = session.scalar(stmt) or 0
    if queued >= max_queued:
        raise TooManyQueuedJobs(
            f"you have {queued} queued jobs, the most a user may have; "
            "wait for some to start or cancel some"
        )


def checkpoint_epochs(session: Session, job_id: str) -> list[int]:
    """The epochs that ``job_id`` has a checkpoint artifact for, ascending."""
    names = session.scalars(
        select(Artifact.name).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
    )
    return sorted(int(m.group(1)) for n in names if (m := _CHECKPOINT.fullmatch(n)))


def _resume_epoch(session: Session, body: JobCreate, owner_id: int | None) -> int | None:
    """The checkpoint epoch a resumed job starts from; InvalidJobRequest if it cannot."""
    if body.resume_from is None:
        return None
    try:
        source = get_job(session, body.resume_from.job_id, owner_id=owner_id)
    except JobNotFound as exc:
        # Another user's job reads exactly as a missing one.
        raise InvalidJobRequest(("resume_from", "job_id"), "no job with this id") from exc
    epochs = checkpoint_epochs(session, source.id)
    wanted = body.resume_from.epoch
    if wanted is None and not epochs:
        raise InvalidJobRequest(("resume_from", "job_id"), "this job has no checkpoint yet")
    if wanted is not None and wanted not in epochs:
        raise InvalidJobRequest(
            ("resume_from", "epoch"), f"no checkpoint for this epoch; there are {epochs}"
        )
    epoch = wanted if wanted is not None else epochs[-1]
    _check_resumable(body, source, epoch)
    return epoch


def _check_resumable(body: JobCreate, source: Job, epoch: int) -> None:
    hp = body.hyperparameters
    if hp.n_epochs <= epoch:
        raise InvalidJobRequest(
            ("hyperparameters", "n_epochs"),
            f"must be greater than the checkpoint's epoch {epoch}: "
            f"the job trains epochs {epoch + 1} to n_epochs",
        )
    source_model = source.hyperparameters.get("model")
    if source_model is not None and source_model != hp.model:
        raise InvalidJobRequest(
            ("hyperparameters", "model"), f"must be the checkpoint's model {source_model!r}"
        )
    # The checkpoint holds that optimizer's state; another optimizer cannot load it.
    source_optimizer = source.hyperparameters.get("optimizer", "sgd")
    if source_optimizer != hp.optimizer:
        raise InvalidJobRequest(
            ("hyperparameters", "optimizer"),
            f"must be the checkpoint's optimizer {source_optimizer!r}",
        )


def request_cancel(session: Session, job_id: str, *, owner_id: int | None = None) -> Job:
    """Cancel a queued job at once, flag a running one; JobConflict for a finished one."""
    get_job(session, job_id, owner_id=owner_id)
    cancelled = _update_where(
        session,
        job_id,
        JobStatus.QUEUED,
        status=JobStatus.CANCELLED,
        cancel_requested=True,
        finished_at=utcnow(),
    )
    flagged = cancelled or _update_where(session, job_id, JobStatus.RUNNING, cancel_requested=True)
    if cancelled:
        events.status_changed(session, job_id, "cancelled", "cancelled while queued")
    elif flagged:
        message = "cancellation requested: the worker stops at its next log interval"
        events.append(session, job_id, [events.line(message, reason="cancel_requested")])
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    if not flagged:
        raise JobConflict(
            f"job {job_id} is {job.status}; only queued or running jobs can be cancelled"
        )
    return job


def _update_where(session: Session, job_id: str, in_status: str, **values: Any) -> bool:
    """A conditional UPDATE: True if the job was in ``in_status`` and changed."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == in_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    result = cast(CursorResult[Any], session.execute(stmt))
    return result.rowcount == 1


def set_priority(
    session: Session, job_id: str, priority: int, *, owner_id: int | None = None
) -> Job:
    """Change a queued job's priority; JobConflict once it runs or has finished."""
    get_job(session, job_id, owner_id=owner_id)
    changed = _update_where(session, job_id, JobStatus.QUEUED, priority=priority)
    session.commit()
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    if not changed:
        raise JobConflict(f"job {job_id} is {job.status}; only a queued job's priority can change")
    return job


def encode_cursor(job: Job) -> str:
    """An opaque cursor that continues a listing after ``job``."""
    created = _aware(job.created_at).isoformat()
    raw = json.dumps([created, job.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) from a cursor made by encode_cursor; InvalidCursor otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = _aware(datetime.fromisoformat(created))
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidCursor("cursor is not one this API handed out") from exc
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidCursor("cursor is not one this API handed out")
    return when, job_id


def _aware(when: datetime) -> datetime:
    # SQLite hands timestamps back without a zone; every timestamp mnistq writes is UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def list_jobs(
    session: Session,
    *,
    statuses: Sequence[str] | None = None,
    limit: int = 50,
    cursor: str | None = None,
    owner_id: int | None = None,
) -> tuple[list[Job], str | None]:
    """One page of jobs, newest first, and the cursor of the next page (None at the end)."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    if owner_id is not None:
        stmt = stmt.where(Job.owner_id == owner_id)
    if statuses:
        stmt = stmt.where(Job.status.in_(statuses))
    if cursor is not None:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    jobs = list(session.scalars(stmt))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return jobs, encode_cursor(jobs[-1]) if more else None


def epoch_results(session: Session, job_ids: Iterable[str]) -> dict[str, list[Metric]]:
    """The test-set metrics of each job, by epoch, in one query."""
    ids = list(job_ids)
    results: dict[str, list[Metric]] = {job_id: [] for job_id in ids}
    if not ids:
        return results
    stmt = (
        select(Metric)
        .where(Metric.job_id.in_(ids), Metric.kind == "test")
        .order_by(Metric.epoch, Metric.id)
    )
    for metric in session.scalars(stmt):
        results[metric.job_id].append(metric)
    return results


def artifacts_of(session: Session, job_ids: Iterable[str]) -> dict[str, list[Artifact]]:
    """The artifact rows of each job, by name, in one query."""
    ids = list(job_ids)
    found: dict[str, list[Artifact]] = {job_id: [] for job_id in ids}
    if not ids:
        return found
    stmt = select(Artifact).where(Artifact.job_id.in_(ids)).order_by(Artifact.name)
    for artifact in session.scalars(stmt):
        found[artifact.job_id].append(artifact)
    return found


@dataclass(frozen=True)
class MetricSeries:
    """A job's train points (one page, or thinned) and test points, in logged order."""

    train: list[Metric]
    test: list[Metric]
    next_after_step: int | None  # more train points follow this step


def metric_series(
    session: Session,
    job_id: str,
    *,
    after_step: int | None = None,
    limit: int = 10_000,
    max_points: int | None = None,
) -> MetricSeries:
    """The metric rows of a job after ``after_step``: at most ``limit`` train points, or the
    train series thinned to about ``max_points``; every test point after that step."""
    after = -1 if after_step is None else after_step
    test = list(session.scalars(_series(job_id, "test", after)))
    if max_points is not None:
        return MetricSeries(_thinned(session, job_id, after, max_points), test, None)
    train = list(session.scalars(_series(job_id, "train", after).limit(limit + 1)))
    more = len(train) > limit
    train = train[:limit]
    return MetricSeries(train, test, train[-1].step if more else None)


def _series(job_id: str, kind: str, after: int) -> Select[Metric]:
    # ix_metric_job_kind_step serves both the filter and the order.
    return (
        select(Metric)
        .where(Metric.job_id == job_id, Metric.kind == kind, Metric.step > after)
        .order_by(Metric.step, Metric.id)
    )


def _thinned(session: Session, job_id: str, after: int, max_points: int) -> list[Metric]:
    """Every k-th train point (k chosen for at most ``max_points``) and the last one."""
    count_stmt = select(func.count()).where(
        Metric.job_id == job_id, Metric.kind == "train", Metric.step > after
    )
    total = session.scalar(count_stmt) or 0
    stride = max(1, math.ceil((total - 1) / max(1, max_points - 1)))
    if stride == 1:
        return list(session.scalars(_series(job_id, "train", after)))
    numbered = (
        select(Metric.id, func.row_number().over(order_by=(Metric.step, Metric.id)).label("n"))
        .where(Metric.job_id == job_id, Metric.kind == "train", Metric.step > after)
        .subquery()
    )
    # Row numbers start at 1: keep rows 1, 1 + k, 1 + 2k, ... and the last row.
    keep = select(numbered.c.id).where(or_((numbered.c.n - 1) % stride == 0, numbered.c.n == total))
    stmt = select(Metric).where(Metric.id.in_(keep)).order_by(Metric.step, Metric.id)
    return list(session.scalars(stmt))


def get_artifact(session: Session, job_id: str, name: str) -> Artifact:
    """The artifact row ``name`` of ``job_id``; ArtifactNotFound if the job has none."""
    stmt = select(Artifact).where(Artifact.job_id == job_id, Artifact.name == validate_name(name))
    artifact = session.scalars(stmt).one_or_none()
    if artifact is None:
        raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
    return artifact
