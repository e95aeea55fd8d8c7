"""Dashboard sessions: started at sign-in, found by the cookie's random id, ended by sign-out,
by idleness or by revoking the token they were signed in with."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from shared.lease import as_utc
from shared.models import ApiToken, DashboardSession, utcnow

# last_seen_at is written at most this often per session, not on every request: an idle
# lifetime of hours does not need a write per dashboard poll.
TOUCH_EVERY = timedelta(minutes=1)


def hash_session_id(session_id: str) -> str:
    """sha256 hex of a session id: what the row stores and is found by."""
    # Like tokens, ids are 256 random bits: a fast hash suffices, nothing to brute-force.
    return hashlib.sha256(session_id.encode()).hexdigest()


def start_session(db: Session, token: ApiToken, idle: timedelta) -> str:
    """A new session of ``token`` and commit; its id, for the cookie (nowhere else)."""
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    # Sessions nobody ended are dropped here, so the table holds only live ones.
    db.execute(delete(DashboardSession).where(DashboardSession.last_seen_at < now - idle))
    row = DashboardSession(id_hash=hash_session_id(session_id), token_id=token.id)
    row.created_at = row.last_seen_at = now
    db.add(row)
    db.commit()
    return session_id


def find_session(db: Session, session_id: str, idle: timedelta) -> ApiToken | None:
    """The live token of session ``session_id``; None once it ended, idled out or was revoked."""
    row = db.get(DashboardSession, hash_session_id(session_id))
    if row is None:
        return None
    now = utcnow()
    seen = as_utc(row.last_seen_at)
    if now - seen > idle or row.token.revoked_at is not None:
        db.delete(row)
        db.commit()
        return None
    if now - seen > TOUCH_EVERY:
        row.last_seen_at = now
        db.commit()
    return row.token


def end_session(db: Session, session_id: str) -> None:
    """Delete session ``session_id`` and commit; ending an ended session is harmless."""
    db.execute(
        delete(DashboardSession).where(DashboardSession.id_hash == hash_session_id(session_id))
    )
    db.commit()


def end_sessions_of(db: Session, token: ApiToken) -> None:
    """Delete every session signed in with ``token`` (the caller commits)."""
    db.execute(delete(DashboardSession).where(DashboardSession.token_id == token.id))
