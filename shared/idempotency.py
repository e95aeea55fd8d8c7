"""Idempotent creation: a row is stored once per (owner, Idempotency-Key), replayed after.

Jobs and sweeps are created the same way: the key is kept scoped to its owner, with the
sha256 of the validated request. The same key with the same body answers the earlier row; with
another body, IdempotencyKeyReused. Two requests racing with one key both insert, the unique
index lets one win, and the loser answers the winner's row.
"""

from __future__ import annotations

import hashlib
import json
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import Job, Sweep

Keyed = TypeVar("Keyed", Job, Sweep)


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key already used for a request with a different body."""


def request_digest(body: BaseModel) -> str:
    """sha256 of the validated request, the same for equal requests whatever their key order."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def scoped_key(key: str | None, owner_id: int | None) -> str | None:
    """The stored form of an Idempotency-Key: sha256 of owner and key, so keys are per user."""
    if key is None or owner_id is None:
        return key
    return hashlib.sha256(f"{owner_id}:{key}".encode()).hexdigest()


def earlier(session: Session, model: type[Keyed], key: str | None, digest: str) -> Keyed | None:
    """The row stored before under ``key`` (None: no key, or none yet); IdempotencyKeyReused
    when it was stored for another body."""
    if key is None:
        return None
    found = session.scalars(select(model).where(model.idempotency_key == key)).one_or_none()
    if found is not None and found.request_hash != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key was already used for {model.__tablename__} {found.id} "
            "with a different body"
        )
    return found


def store(session: Session, row: Keyed, key: str | None, digest: str) -> tuple[Keyed, bool]:
    """Add ``row`` and commit: (row, True); (the row that won, False) when a request with the
    same key committed first."""
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        won = earlier(session, type(row), key, digest)
        if won is None:
            raise
        return won, False
    return row, True
