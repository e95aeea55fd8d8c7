"""The reaper: requeue jobs whose worker died, re-publish queued jobs whose message was lost."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from shared.celery_app import BrokerUnavailable
from shared.config import Settings
from shared.lease import Expired, republish_due, requeue_expired

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
