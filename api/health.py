"""The health route: can this API reach its database and its broker?"""

from __future__ import annotations

import logging

from flask import Blueprint
from flask.typing import ResponseReturnValue
from kombu import Connection
from sqlalchemy import text

from api.auth import public
from api.db import get_engine
from api.extensions import services
from api.openapi import operation
from api.serialize import dump
from shared.config import Settings
from shared.schemas import ComponentHealthOut, HealthOut

logger = logging.getLogger(__name__)
bp = Blueprint("health", __name__, url_prefix="/api/v1")

BROKER_TIMEOUT_SECONDS = 2.0
DOWN = "unreachable"  # all a caller learns; hosts, ports, roles and paths go to the log


def _down(component: str, detail: str) -> ComponentHealthOut:
    """A component that did not answer: the detail logged, only up/down answered."""
    logger.warning("health check: %s unreachable: %s", component, detail)
    return ComponentHealthOut(ok=False, error=DOWN)


def check_database() -> ComponentHealthOut:
    """Run ``SELECT 1``."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "down"; the log says which
        return _down("database", f"{type(exc).__name__}: {exc}")
    return ComponentHealthOut(ok=True)


def check_broker(settings: Settings) -> ComponentHealthOut:
    """Open one connection to the broker, giving up after a couple of seconds."""
    if settings.broker_url.startswith("filesystem://"):
        queue = settings.broker_dir / "queue"
        if queue.is_dir():
            return ComponentHealthOut(ok=True)
        return _down("broker", f"broker folder {queue} does not exist")
    try:
        with Connection(settings.broker_url, connect_timeout=BROKER_TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_SECONDS
            )
    except Exception as exc:  # kombu raises many kinds; all mean "unreachable"
        return _down("broker", f"{type(exc).__name__}: {exc}")
    return ComponentHealthOut(ok=True)


@bp.get("/health")
@operation(summary="Database and broker reachability", responses={200: HealthOut, 503: HealthOut})
@public
def health() -> ResponseReturnValue:
    """200 when the database and the broker answer, 503 naming the one that does not.

    Open to anyone, so it says only up or down per component; why is in the API's log.
    """
    database = check_database()
    broker = check_broker(services().settings)
    ok = database.ok and broker.ok
    out = HealthOut(status="ok" if ok else "unavailable", database=database, broker=broker)
    return dump(out), 200 if ok else 503
