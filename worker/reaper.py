"""The reaper: requeue jobs whose worker died, re-publish queued jobs whose message was lost."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared.celery_app import REAP_TASK, BrokerUnavailable
from shared.config import Settings
from shared.lease import Expired, republish_due, requeue_expired

if TYPE_CHECKING:
    from worker.tasks import WorkerContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReapReport:
    """What one reaper pass did."""

    expired: Expired
    published: list[str]


def reap_once(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publish: Callable[[str, str], None],
) -> ReapReport:
    """One pass: expired leases → queued (or failed), then publish queued rows that need it."""
    expired = requeue_expired(session_factory, max_attempts=settings.max_attempts)
    try:
        # Requeued rows have published_at NULL, so they go out in this same pass.
        published = republish_due(
            session_factory, publish, grace_seconds=settings.requeue_grace_seconds
        )
    except BrokerUnavailable as exc:
        logger.warning("reaper: broker unavailable, publishing again next pass: %s", exc)
        published = []
    if published:
        logger.info("reaper: published %d queued job(s): %s", len(published), published)
    return ReapReport(expired, published)


def run_reaper(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publish: Callable[[str, str], None],
    stop: threading.Event,
) -> None:
    """Reap every ``reaper_interval_seconds`` until ``stop`` is set (``mnistq up``'s loop)."""
    while not stop.is_set():
        try:
            reap_once(settings, session_factory, publish)
        except DBAPIError:
            logger.warning("reaper: database unavailable, trying again", exc_info=True)
        stop.wait(settings.reaper_interval_seconds)


def register_reap_task(app: Celery, ctx: WorkerContext) -> None:
    """Register ``mnistq.reap`` (maintenance queue, run by beat) on ``app``."""

    @app.task(name=REAP_TASK, ignore_result=True)
    def reap() -> dict[str, list[str]]:
        """One reaper pass."""
        report = reap_once(ctx.settings, ctx.session_factory, ctx.publish)
        return {"requeued": report.expired.requeued, "published": report.published}
