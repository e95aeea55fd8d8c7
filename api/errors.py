"""Every error as JSON ``{"error", "message", "details"}``, mapped from exceptions in one place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import Flask, Response, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import (
    ClientDisconnected,
    HTTPException,
    MethodNotAllowed,
    RequestEntityTooLarge,
    TooManyRequests,
)

from shared.artifacts import ArtifactNotFound, InvalidArtifactName
from shared.celery_app import BrokerUnavailable
from shared.idempotency import IdempotencyKeyReused
from shared.jobs import (
    InvalidCursor,
    InvalidJobRequest,
    JobConflict,
    JobNotFound,
    TooManyQueuedJobs,
)
from shared.store import StoreUnavailable
from shared.sweeps import SweepConflict, SweepNotFound
from shared.webhooks import InvalidWebhookUrl, WebhookNotFound
from shared.workers import WorkerNotFound

logger = logging.getLogger(__name__)
QUEUE_FULL_RETRY_SECONDS = 30  # a guess at when a queued job will have started
MAX_REPORTED_ERRORS = 20  # validation errors one response lists; the message gives the total
MAX_LOC_PART = 100  # characters of one key in a reported loc

Loc = Sequence[str | int]


class ApiError(Exception):
    """An error response: HTTP status, short code, sentence and optional details."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})


def field_error(loc: Loc, msg: str, kind: str = "value_error") -> dict[str, Any]:
    """One entry of a validation error's details."""
    return {"loc": list(loc), "msg": msg, "type": kind}


def validation_failed(errors: list[dict[str, Any]]) -> ApiError:
    """A 422 whose message names the bad fields and whose details say what is wrong with each.

    At most MAX_REPORTED_ERRORS are reported, with the total: a body of thousands of unknown
    keys gets a short answer, not one that grows with the body (each error is said once).
    """
    shown = errors[:MAX_REPORTED_ERRORS]
    named = ", ".join(".".join(map(str, e["loc"])) for e in shown)
    noun = "field is" if len(errors) == 1 else "fields are"
    more = f" (the first {len(shown)} listed)" if len(errors) > len(shown) else ""
    return ApiError(422, "validation_error", f"{len(errors)} {noun} invalid{more}: {named}", shown)


def from_pydantic(exc: ValidationError, where: str) -> ApiError:
    """A 422 from pydantic's errors, each loc prefixed with body, query or header."""
    # The offending input is left out: it can be huge, and the loc already names it.
    errors = [
        field_error([where, *map(_short, e["loc"])], e["msg"], e["type"]) for e in exc.errors()
    ]
    return validation_failed(errors)


def _short(part: str | int) -> str | int:
    """A loc part as reported: an unknown key can be as long as the body; its start names it."""
    if isinstance(part, str) and len(part) > MAX_LOC_PART:
        return part[:MAX_LOC_PART] + "…"
    return part


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    """The JSON response every error uses."""
    response = jsonify({"error": code, "message": message, "details": details})
    response.status_code = status
    return response


def _api_error(exc: ApiError) -> Response:
    response = error_response(exc.status, exc.code, exc.message, exc.details)
    response.headers.update(exc.headers)
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    message = exc.description or exc.name or "error"
    if isinstance(exc, RequestEntityTooLarge):
        code, message = "payload_too_large", "the request body is larger than this API accepts"
    if isinstance(exc, TooManyRequests):
        code, message = "rate_limited", f"too many requests: at most {exc.description}; retry later"
    response = error_response(status, code, message)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    return response


def _invalid_request(exc: InvalidJobRequest) -> Response:
    errors = [field_error(["body", *e.loc], e.msg) for e in exc.errors]
    return _api_error(validation_failed(errors))


def _invalid_cursor(exc: InvalidCursor) -> Response:
    return _api_error(validation_failed([field_error(["query", "cursor"], str(exc))]))


def _database_down(exc: Exception) -> Response:
    logger.warning("database unavailable: %s", exc)
    return error_response(503, "database_unavailable", "the database is not reachable right now")


def _broker_down(exc: BrokerUnavailable) -> Response:
    logger.warning("broker unavailable: %s", exc)
    return error_response(503, "broker_unavailable", "the message broker is not reachable")


def _slow_body(exc: Exception) -> Response:
    # A read of the body waited longer than body_timeout_seconds (api/serving.py); werkzeug
    # reports it as ClientDisconnected, as it does a client that went away.
    logger.info("request body timed out: %r", exc)
    response = error_response(408, "request_timeout", "the request body did not arrive in time")
    response.headers["Connection"] = "close"  # the rest of the body would read as a request
    return response


def _store_down(exc: StoreUnavailable) -> Response:
    logger.warning("artifact store unavailable: %s", exc)
    return error_response(503, "store_unavailable", "the artifact store is not reachable right now")


def _invalid_webhook_url(exc: InvalidWebhookUrl) -> Response:
    return _api_error(validation_failed([field_error(["body", "url"], str(exc))]))


def _unexpected(exc: Exception) -> Response:
    logger.exception("unhandled error")
    return error_response(500, "internal_error", "an unexpected error occurred; it was logged")


def _queue_full(exc: TooManyQueuedJobs) -> Response:
    response = error_response(429, "too_many_queued_jobs", str(exc))
    response.headers["Retry-After"] = str(QUEUE_FULL_RETRY_SECONDS)
    return response


def _simple(status: int, code: str) -> Callable[[Exception], Response]:
    """A handler answering ``status`` with the exception's own message."""

    def handler(exc: Exception) -> Response:
        return error_response(status, code, str(exc))

    return handler


def init_app(app: Flask) -> None:
    """Register the JSON error handlers on ``app``."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(JobNotFound, _simple(404, "job_not_found"))
    app.register_error_handler(WorkerNotFound, _simple(404, "worker_not_found"))
    app.register_error_handler(ArtifactNotFound, _simple(404, "artifact_not_found"))
    app.register_error_handler(InvalidArtifactName, _simple(400, "invalid_artifact_name"))
    app.register_error_handler(JobConflict, _simple(409, "job_state_conflict"))
    app.register_error_handler(IdempotencyKeyReused, _simple(422, "idempotency_key_reused"))
    app.register_error_handler(SweepNotFound, _simple(404, "sweep_not_found"))
    app.register_error_handler(SweepConflict, _simple(409, "sweep_state_conflict"))
    app.register_error_handler(TooManyQueuedJobs, _queue_full)
    app.register_error_handler(InvalidJobRequest, _invalid_request)
    app.register_error_handler(InvalidCursor, _invalid_cursor)
    for db_error in (OperationalError, InterfaceError, PoolTimeout):
        app.register_error_handler(db_error, _database_down)
    app.register_error_handler(BrokerUnavailable, _broker_down)
    app.register_error_handler(WebhookNotFound, _simple(404, "webhook_not_found"))
    app.register_error_handler(InvalidWebhookUrl, _invalid_webhook_url)
    app.register_error_handler(ClientDisconnected, _slow_body)
    app.register_error_handler(TimeoutError, _slow_body)
    app.register_error_handler(StoreUnavailable, _store_down)
    app.register_error_handler(Exception, _unexpected)
