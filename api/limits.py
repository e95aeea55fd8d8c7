"""The submit rate limit per token (Flask-Limiter), counted in Redis or in memory."""

from __future__ import annotations

from flask import Flask, current_app, request
from flask_limiter import Limiter
from limits import parse_many

from api.auth import caller
from api.extensions import services
from shared.config import Settings

KEY = "mnistq.limiter"
STORAGE_TIMEOUT_SECONDS = 2
SUBMIT_SCOPE = "submit"


def _token_key() -> str:
    """Counters are per token, not per address: people behind one NAT do not share them."""
    return f"token:{caller().public_id}"


def init_app(app: Flask, settings: Settings) -> None:
    """Give ``app`` a limiter on the settings' storage; a bad limit string fails here."""
    parse_many(settings.submit_rate_limit)  # ValueError at startup, not on the first submit
    options: dict[str, str | int] = {}
    if settings.ratelimit_storage_uri.startswith("redis"):
        options = {
            "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
            "socket_timeout": STORAGE_TIMEOUT_SECONDS,
        }
    limiter = Limiter(
        key_func=_token_key,
        storage_uri=settings.ratelimit_storage_uri,
        storage_options=options,
        key_prefix="mnistq",
        headers_enabled=True,
        # A Redis outage must not stop submissions: the outbox stores the job and the
        # reaper publishes it later, so the limiter counts in memory meanwhile.
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    # Only submissions are limited, and only through check_submit_rate: reads skip the
    # limiter's per-request work altogether.
    limiter.request_filter(_a_read)
    limiter.init_app(app)
    app.extensions[KEY] = limiter


def _a_read() -> bool:
    return request.method in ("GET", "HEAD", "OPTIONS")


def check_submit_rate() -> None:
    """Count one submission for the caller's token; 429 with Retry-After past the limit.

    The one budget of a token for every way a person submits: POST /api/v1/jobs and the
    dashboard's form call this (a sweep's submission counts once, as one call here). The
    trials a sweep then starts on its own are not people's submissions and never come here.
    """
    limiter: Limiter = current_app.extensions[KEY]
    # Shared: a plain limit() would count per route, and each route would get the budget.
    with limiter.shared_limit(services().settings.submit_rate_limit, scope=SUBMIT_SCOPE):
        pass
