"""Routes of the sweep resource: create, list, show, its trials, cancel."""

from __future__ import annotations

from flask import Blueprint, url_for
from flask.typing import ResponseReturnValue

from api.auth import caller, owner_scope
from api.db import get_session
from api.extensions import services
from api.inputs import IDEMPOTENCY_HEADER, idempotency_key, json_body, query_args
from api.openapi import operation
from api.serialize import sweeps_json, trials_json
from shared.sweep_schemas import ListSweepsQuery, SweepCreate, SweepOut, SweepPageOut, TrialListOut
from shared.sweeps import create_sweep, get_sweep, list_sweeps, request_cancel

bp = Blueprint("sweeps", __name__, url_prefix="/api/v1/sweeps")


@bp.post("")
@operation(
    summary="Start a hyperparameter sweep",
    body=SweepCreate,
    headers={
        IDEMPOTENCY_HEADER: "repeat a creation safely: the same key and body return the same "
        "sweep with 200; the same key with another body is 422 idempotency_key_reused"
    },
    responses={201: SweepOut, 200: SweepOut},
    errors=(400, 413, 422, 503),
)
def create() -> ResponseReturnValue:
    """Validate the search space against the job schema and store the sweep; 201."""
    # Not counted by the job submission rate limit: one request, and its controller
    # submits at most max_concurrent trials at a time.
    body = json_body(SweepCreate)
    session = get_session()
    sweep, created = create_sweep(
        session, body, idempotency_key=idempotency_key(), owner_id=caller().user.id
    )
    location = url_for("sweeps.get", sweep_id=sweep.id)
    return sweeps_json(session, [sweep])[0], 201 if created else 200, {"Location": location}


@bp.get("")
@operation(
    summary="List sweeps, newest first",
    query=ListSweepsQuery,
    responses={200: SweepPageOut},
    errors=(422, 503),
)
def index() -> ResponseReturnValue:
    """The caller's sweeps (an admin's: everyone's), optionally by state."""
    query = query_args(ListSweepsQuery)
    session = get_session()
    sweeps = list_sweeps(
        session,
        statuses=query.status,
        limit=query.limit or services().settings.page_size,
        owner_id=owner_scope(),
    )
    return {"items": sweeps_json(session, sweeps)}


@bp.get("/<sweep_id>")
@operation(summary="Show a sweep", responses={200: SweepOut}, errors=(404, 503))
def get(sweep_id: str) -> ResponseReturnValue:
    """State, budget, trial counts and the best trial of one sweep."""
    session = get_session()
    return sweeps_json(session, [get_sweep(session, sweep_id, owner_id=owner_scope())])[0]


@bp.get("/<sweep_id>/trials")
@operation(
    summary="Trials of a sweep, best first", responses={200: TrialListOut}, errors=(404, 503)
)
def trials(sweep_id: str) -> ResponseReturnValue:
    """Every trial job with its searched values, metric and epochs trained."""
    session = get_session()
    return trials_json(session, get_sweep(session, sweep_id, owner_id=owner_scope()))


@bp.post("/<sweep_id>/cancel")
@operation(summary="Cancel a sweep", responses={202: SweepOut}, errors=(404, 409, 503))
def cancel(sweep_id: str) -> ResponseReturnValue:
    """Cancel queued trials, stop running ones, end the sweep cancelled; 409 if it ended."""
    session = get_session()
    sweep = request_cancel(session, sweep_id, owner_id=owner_scope())
    return sweeps_json(session, [sweep])[0], 202
