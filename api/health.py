"""The health route: can this API reach its database and its broker?"""

from __future__ import annotations

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

bp = Blueprint("health", __name__, url_prefix="/api/v1")

BROKER_TIMEOUT_SECONDS = 2.0


def check_database() -> ComponentHealthOut:
    """Run ``SELECT 1``."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "down"; the message says which
        return ComponentHealthOut(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return ComponentHealthOut(ok=True)


def check_broker(settings: Settings) -> ComponentHealthOut:
    """Open one connection to the broker, giving up after a couple of seconds."""
    if settings.broker_url.startswith("filesystem://"):
        queue = settings.broker_dir / "queue"
        if queue.is_dir():
            return ComponentHealthOut(ok=True)
        return ComponentHealthOut(ok=False, error=f"broker folder {queue} does not exist")
    try:
        with Connection(settings.broker_url, connect_timeout=BROKER_TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_SECONDS
            )
    except Exception as exc:  # kombu raises many kinds; all mean "unreachable"
        return ComponentHealthOut(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return ComponentHealthOut(ok=True)


@bp.get("/health")
@operation(summary="Database and broker reachability", responses={200: HealthOut, 503: HealthOut})
@public
def health() -> ResponseReturnValue:
    """200 when the database and the broker answer, 503 naming the one that does not."""
    database = check_database()
    broker = check_broker(services().settings)
    ok = database.ok and broker.ok
    out = HealthOut(status="ok" if ok else "unavailable", database=database, broker=broker)
    return dump(out), 200 if ok else 503
