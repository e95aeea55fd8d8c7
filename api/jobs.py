"""Routes of the job resource: submit, list, show, cancel and the metric series."""

from __future__ import annotations

import logging

from flask import Blueprint, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy.orm import Session

from api.answer_cache import finished_answers
from api.auth import caller, owner_scope
from api.conditional import IF_NONE_MATCH, NOT_MODIFIED, conditional_bytes, conditional_json
from api.db import get_session, read_connection, session_factory
from api.extensions import services
from api.inputs import IDEMPOTENCY_HEADER, idempotency_key, json_body, query_args
from api.limits import check_submit_rate
from api.openapi import operation
from api.serialize import dump, job_json, jobs_json, metric_out
from shared.celery_app import BrokerUnavailable
from shared.jobs import (
    create_job,
    get_job,
    list_jobs,
    metric_series,
    request_cancel,
    set_priority,
)
from shared.lease import publish_created
from shared.models import Job, utcnow
from shared.schemas import (
    MAX_METRIC_PAGE,
    JobCreate,
    JobOut,
    JobPageOut,
    JobPatch,
    ListJobsQuery,
    MetricsOut,
    MetricsQuery,
)

logger = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")


def submit_job(session: Session, body: JobCreate, key: str | None) -> tuple[Job, bool]:
    """Store the caller's job, stamped as published, and tell the workers; (job, created).
    A broker outage leaves published_at NULL for the reaper to retry."""
    user, stamped = caller().user, utcnow()
    job, created = create_job(
        session,
        body,
        idempotency_key=key,
        owner_id=user.id,
        sees_all=user.is_admin,
        max_queued=services().settings.max_queued_jobs_per_user,
        published_at=stamped,
    )
    if created:
        try:
            publish_created(session_factory(), job.id, job.queue, stamped, services().publish)
        except BrokerUnavailable as exc:
            logger.warning("job %s stored but not published (broker down): %s", job.id, exc)
            session.refresh(job)
    return job, created


@bp.post("")
@operation(
    summary="Submit a training job",
    body=JobCreate,
    headers={
        IDEMPOTENCY_HEADER: "repeat a submission safely: the same key and body return the "
        "same job with 200; the same key with another body is 422 idempotency_key_reused. "
        "Keys are per user."
    },
    responses={201: JobOut, 200: JobOut},
    errors=(400, 413, 422, 429, 503),
)
def create() -> ResponseReturnValue:
    """Validate and store a job, then publish it; 201, or 200 when the key was seen before."""
    check_submit_rate()
    body = json_body(JobCreate)
    key = idempotency_key()
    session = get_session()
    # The row is committed before publishing (outbox): a lost message is re-sent by the
    # reaper, a message for a row that does not exist could not be.
    job, created = submit_job(session, body, key)
    location = url_for("jobs.get", job_id=job.id)
    return job_json(session, job, new=created), 201 if created else 200, {"Location": location}


@bp.get("")
@operation(
    summary="List jobs, newest first",
    query=ListJobsQuery,
    headers=IF_NONE_MATCH,
    responses={200: JobPageOut, 304: NOT_MODIFIED},
    errors=(422, 503),
)
def index() -> ResponseReturnValue:
    """One page of the caller's jobs (an admin's: everyone's), optionally by state."""
    query = query_args(ListJobsQuery)
    session = get_session()
    jobs, cursor = list_jobs(
        session,
        statuses=query.status,
        limit=query.limit or services().settings.page_size,
        cursor=query.cursor,
        owner_id=owner_scope(),
    )
    return conditional_json({"items": jobs_json(session, jobs), "next_cursor": cursor})


@bp.get("/<job_id>")
@operation(
    summary="Show a job",
    headers=IF_NONE_MATCH,
    responses={200: JobOut, 304: NOT_MODIFIED},
    errors=(404, 503),
)
def get(job_id: str) -> ResponseReturnValue:
    """Status, progress, results, artifacts and links of one job."""
    scope, answers = owner_scope(), finished_answers()
    with read_connection() as connection:  # a kept answer needs no session
        kept = answers.lookup(connection, job_id, scope)
    if kept is not None:
        return conditional_bytes(kept.body, kept.etag)
    session = get_session()
    job = get_job(session, job_id, owner_id=scope)
    response = conditional_json(job_json(session, job))
    if response.status_code == 200:
        answers.keep(job, response)
    return response


@bp.patch("/<job_id>")
@operation(
    summary="Change a queued job",
    body=JobPatch,
    responses={200: JobOut},
    errors=(400, 404, 409, 413, 422, 503),
)
def patch(job_id: str) -> ResponseReturnValue:
    """Set a queued job's priority; 409 once it runs or has finished."""
    body = json_body(JobPatch)
    session = get_session()
    return job_json(session, set_priority(session, job_id, body.priority, owner_id=owner_scope()))


@bp.post("/<job_id>/cancel")
@operation(summary="Cancel a job", responses={202: JobOut}, errors=(404, 409, 503))
def cancel(job_id: str) -> ResponseReturnValue:
    """Cancel a queued job now or ask a running one to stop; 409 for a finished job."""
    session = get_session()
    return job_json(session, request_cancel(session, job_id, owner_id=owner_scope())), 202


@bp.get("/<job_id>/metrics")
@operation(
    summary="Metric series of a job",
    query=MetricsQuery,
    headers=IF_NONE_MATCH,
    responses={200: MetricsOut, 304: NOT_MODIFIED},
    errors=(404, 422, 503),
)
def metrics(job_id: str) -> ResponseReturnValue:
    """The train-loss series, a page at a time or thinned, and the per-epoch test series."""
    query = query_args(MetricsQuery)
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    series = metric_series(
        session, job.id, after_step=query.after_step, limit=query.limit or MAX_METRIC_PAGE,
        max_points=query.max_points,
    )  # fmt: skip
    out = MetricsOut(
        job_id=job.id,
        train=[metric_out(m) for m in series.train],
        test=[metric_out(m) for m in series.test],
        next_after_step=series.next_after_step,
    )
    return conditional_json(dump(out))
