"""The JSON shapes of jobs, metrics and artifacts, built through the response schemas."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, overload

from flask import g, url_for
from pydantic import BaseModel
from sqlalchemy.orm import Session

from shared.jobs import artifacts_of, epoch_results
from shared.models import Artifact, Job, JobStatus, Metric, Sweep, SweepStatus
from shared.schemas import (
    ArtifactOut,
    JobErrorOut,
    JobLinksOut,
    JobOut,
    LeaseOut,
    MetricPointOut,
    ProgressOut,
    QueueStatusOut,
    ResumeFromOut,
    TestMetricOut,
    progress_figures,
)
from shared.sweep_schemas import (
    SweepBestOut,
    SweepBudgetOut,
    SweepLinksOut,
    SweepMetric,
    SweepOut,
    TrialCountsOut,
    TrialListOut,
    TrialOut,
)
from shared.sweeps import (
    best_trial,
    counts,
    ranked,
    trial_params,
    trial_value,
    trials_by_sweep,
    trials_of,
)
from shared.workers import queue_status


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as JSON-ready data (ISO 8601 timestamps, aliases like ``self``)."""
    return model.model_dump(mode="json", by_alias=True)


@overload
def utc(when: datetime) -> datetime: ...
@overload
def utc(when: None) -> None: ...
def utc(when: datetime | None) -> datetime | None:
    """``when`` as an aware UTC datetime; SQLite returns them without a zone."""
    if when is None:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def progress_out(job: Job) -> ProgressOut:
    """Progress with the completed fraction and, while running, an ETA."""
    total, seen, speed = job.total_samples, job.samples_seen, job.samples_per_second
    fraction, eta = progress_figures(
        seen, total, speed, running=job.status == JobStatus.RUNNING,
        succeeded=job.status == JobStatus.SUCCEEDED,
    )  # fmt: skip
    return ProgressOut(
        epoch=job.epoch,
        n_epochs=job.n_epochs,
        step=job.step,
        steps_per_epoch=job.steps_per_epoch,
        samples_seen=seen,
        total_samples=total,
        fraction=fraction,
        samples_per_second=speed,
        eta_seconds=eta,
    )


def resource_url(endpoint: str, **values: str) -> str:
    """``url_for(endpoint, **values)`` for values that a URL carries as they are: hex ids and
    artifact names (letters, digits, ``._-`` and ``/``). url_for runs once per endpoint and
    request, for a template the values are then put into: a page of 50 jobs has some 250
    links, and url_for was a quarter of the page's time."""
    templates: dict[str, str] = g.setdefault("url_templates", {})
    template = templates.get(endpoint)
    if template is None:
        # "~" is never quoted and is in no id or artifact name: a placeholder kept as it is.
        placeholders: dict[str, Any] = {key: f"~{key}~" for key in values}
        template = url_for(endpoint, **placeholders)
        templates[endpoint] = template
    for key, value in values.items():
        template = template.replace(f"~{key}~", value)
    return template


def artifact_out(artifact: Artifact) -> ArtifactOut:
    """An artifact row with its download URL."""
    url = resource_url("artifacts.download", job_id=artifact.job_id, name=artifact.name)
    return ArtifactOut(
        name=artifact.name,
        kind=artifact.kind,
        size=artifact.size,
        sha256=artifact.sha256,
        created_at=utc(artifact.created_at),
        url=url,
    )


def metric_out(metric: Metric) -> MetricPointOut:
    """One metric row as a series point."""
    return MetricPointOut(
        epoch=metric.epoch,
        step=metric.step,
        samples_seen=metric.samples_seen,
        loss=metric.loss,
        accuracy=metric.accuracy,
        seconds=metric.seconds,
    )


def _test_metric(metric: Metric) -> TestMetricOut:
    return TestMetricOut(epoch=metric.epoch, loss=metric.loss, accuracy=metric.accuracy)


def _links(job_id: str) -> JobLinksOut:
    links = {
        "self": resource_url("jobs.get", job_id=job_id),
        "metrics": resource_url("jobs.metrics", job_id=job_id),
        "artifacts": resource_url("artifacts.index", job_id=job_id),
        "cancel": resource_url("jobs.cancel", job_id=job_id),
    }
    return JobLinksOut.model_validate(links)


def _error(job: Job) -> JobErrorOut | None:
    if job.error_message is None and job.error_traceback is None:
        return None
    return JobErrorOut(message=job.error_message, traceback=job.error_traceback)


def _resume(job: Job) -> ResumeFromOut | None:
    if job.resume_from_job_id is None:
        return None
    return ResumeFromOut(job_id=job.resume_from_job_id, epoch=job.resume_from_epoch)


def lease_out(job: Job, now: datetime) -> LeaseOut | None:
    """The lease of a running job, saying so when its worker stopped beating."""
    if job.status != JobStatus.RUNNING:
        return None
    expires = utc(job.lease_expires_at)
    expired = expires is not None and expires < now
    message = (
        "the worker running this job stopped heartbeating; the next reaper pass of any worker "
        "requeues it"
        if expired
        else None
    )
    return LeaseOut(
        worker_id=job.worker_id, pid=job.worker_pid, expires_at=expires, expired=expired,
        message=message,
    )  # fmt: skip


def job_out(
    job: Job,
    artifacts: Sequence[Artifact],
    tests: Sequence[Metric],
    waiting: QueueStatusOut | None = None,
) -> JobOut:
    """A job row with its artifacts and per-epoch test results as the API shows it."""
    return JobOut(
        id=job.id,
        name=job.name,
        status=JobStatus(job.status).value,
        hyperparameters=job.hyperparameters,
        device_requested=job.device_requested,
        device_used=job.device_used,
        queue=job.queue,
        priority=job.priority,
        attempt=job.attempt,
        worker=job.worker_hostname,
        cancel_requested=job.cancel_requested,
        sweep_id=job.sweep_id,
        trial_number=job.trial_number,
        created_at=utc(job.created_at),
        queued_at=utc(job.queued_at),
        published_at=utc(job.published_at),
        started_at=utc(job.started_at),
        heartbeat_at=utc(job.heartbeat_at),
        finished_at=utc(job.finished_at),
        progress=progress_out(job),
        train_loss=job.train_loss,
        test_loss=job.test_loss,
        test_accuracy=job.test_accuracy,
        test_metrics=[
            TestMetricOut(epoch=m.epoch, loss=m.loss, accuracy=m.accuracy) for m in tests
        ],
        error=_error(job),
        resume_from=_resume(job),
        artifacts=[artifact_out(a) for a in artifacts],
        links=_links(job.id),
        queue_status=waiting,
        lease=lease_out(job, datetime.now(UTC)),
    )


def jobs_json(session: Session, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Jobs as JSON, loading their artifacts and test results in two queries in all."""
    ids = [job.id for job in jobs]
    artifacts, tests = artifacts_of(session, ids), epoch_results(session, ids)
    waiting = queue_status_out(session, jobs)
    return [
        dump(job_out(job, artifacts[job.id], tests[job.id], waiting.get(job.id))) for job in jobs
    ]


def queue_status_out(session: Session, jobs: Sequence[Job]) -> dict[str, QueueStatusOut]:
    """Where each queued job of ``jobs`` waits (two more queries only when one is queued)."""
    return {
        job_id: QueueStatusOut(
            position=status.position, live_workers=status.live_workers, message=status.message
        )
        for job_id, status in queue_status(session, jobs).items()
    }


def job_json(session: Session, job: Job, *, new: bool = False) -> dict[str, Any]:
    """One job as JSON; ``new``: created by this request, so it has no artifacts or test
    results to read yet."""
    if new:
        return dump(job_out(job, [], [], queue_status_out(session, [job]).get(job.id)))
    return jobs_json(session, [job])[0]


def sweep_out(sweep: Sweep, trials: Sequence[Job]) -> SweepOut:
    """A sweep row with its trial counts and best trial as the API shows it."""
    spec = sweep.spec
    best = best_trial(sweep, trials)
    return SweepOut(
        id=sweep.id,
        name=sweep.name,
        status=SweepStatus(sweep.status).value,
        method=sweep.method,
        metric=SweepMetric.model_validate(spec["metric"]),
        parameters=spec["parameters"],
        base=spec["base"],
        budget=SweepBudgetOut(
            max_trials=sweep.max_trials,
            max_concurrent=sweep.max_concurrent,
            max_failed=sweep.max_failed,
        ),
        early_terminate=spec.get("early_terminate"),
        seed=spec["seed"],
        trials=len(trials),
        counts=TrialCountsOut.model_validate(counts(trials)),
        best=None
        if best is None
        else SweepBestOut(
            job_id=best.job.id,
            trial_number=best.job.trial_number or 0,
            value=best.value,
            hyperparameters=best.job.hyperparameters,
        ),
        error=sweep.error_message,
        controller=sweep.controller if sweep.status == SweepStatus.RUNNING else None,
        created_at=utc(sweep.created_at),
        finished_at=utc(sweep.finished_at),
        links=SweepLinksOut.model_validate(
            {
                "self": resource_url("sweeps.get", sweep_id=sweep.id),
                "trials": resource_url("sweeps.trials", sweep_id=sweep.id),
                "cancel": resource_url("sweeps.cancel", sweep_id=sweep.id),
            }
        ),
    )


def sweeps_json(session: Session, sweeps: Sequence[Sweep]) -> list[dict[str, Any]]:
    """Sweeps as JSON, their trials loaded in one query."""
    trials = trials_by_sweep(session, [sweep.id for sweep in sweeps])
    return [dump(sweep_out(sweep, trials[sweep.id])) for sweep in sweeps]


def trials_json(session: Session, sweep: Sweep) -> dict[str, Any]:
    """A sweep's trials, best first, each with its job as /jobs shows it."""
    jobs = ranked(sweep, trials_of(session, sweep.id))
    tests = epoch_results(session, [job.id for job in jobs])
    items = [
        TrialOut(
            trial_number=job.trial_number or 0,
            params=trial_params(sweep, job),
            value=trial_value(sweep, job),
            epochs_trained=sum(1 for m in tests[job.id] if m.epoch > 0),  # not the epoch-0 test
            job=JobOut.model_validate(data),
        )
        for job, data in zip(jobs, jobs_json(session, jobs), strict=True)
    ]
    return dump(TrialListOut(sweep_id=sweep.id, items=items))
