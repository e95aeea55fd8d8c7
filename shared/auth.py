"""Users and their API tokens: create, list, revoke, and find the user a bearer token names."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from shared.models import ApiToken, User, utcnow
from shared.sessions import end_sessions_of

TOKEN_PREFIX = "mnq_"
# mnq_ + token_urlsafe(32): 43 characters of base64url, 256 bits of randomness.
TOKEN_PATTERN = re.compile(r"mnq_[A-Za-z0-9_-]{43}")
USER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class UserExists(ValueError):
    """A user with this name exists already."""


class UserNotFound(LookupError):
    """No user has this name."""


class TokenNotFound(LookupError):
    """No token has this public id."""


class InvalidUserName(ValueError):
    """A user name that is not 1-64 letters, digits, '_', '.', '@' or '-'."""


@dataclass(frozen=True)
class IssuedToken:
    """A token just created: the clear secret, shown once, and its row."""

    secret: str
    token: ApiToken


def hash_token(secret: str) -> str:
    """sha256 hex of a token: what the database stores and looks tokens up by."""
    # A fast hash is right here: tokens are 256 random bits, not passwords, so there is
    # nothing to brute-force and no need for a slow, salted KDF.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token_secret() -> str:
    """A fresh bearer token: the prefix (easy to spot in leaked text) and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_user(session: Session, name: str, *, admin: bool = False) -> tuple[User, IssuedToken]:
    """Store a user with a first token and commit; UserExists if the name is taken."""
    if not USER_NAME_PATTERN.fullmatch(name):
        raise InvalidUserName(
            f"user name {name!r} must be 1 to 64 letters, digits, '_', '.', '@' or '-'"
        )
    user = User(name=name, is_admin=admin)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise UserExists(f"a user named {name!r} exists already") from exc
    issued = _issue(session, user)
    session.commit()
    return user, issued


def create_token(session: Session, user_name: str) -> IssuedToken:
    """Give the user ``user_name`` another token and commit."""
    issued = _issue(session, get_user(session, user_name))
    session.commit()
    return issued


def _issue(session: Session, user: User) -> IssuedToken:
    secret = new_token_secret()
    token = ApiToken(user=user, public_id=secrets.token_hex(4), token_hash=hash_token(secret))
    session.add(token)
    session.flush()
    return IssuedToken(secret, token)


def get_user(session: Session, name: str) -> User:
    """The user called ``name``; UserNotFound otherwise."""
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise UserNotFound(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    """Every user, oldest first, tokens loaded."""
    return list(session.scalars(select(User).order_by(User.id)))


def revoke_token(session: Session, public_id: str) -> ApiToken:
    """Revoke a token by its public id and commit; revoking twice is harmless."""
    token = session.scalars(select(ApiToken).where(ApiToken.public_id == public_id)).one_or_none()
    if token is None:
        raise TokenNotFound(f"no token with id {public_id!r}")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        end_sessions_of(session, token)  # the dashboard browsers signed in with it, at once
        session.commit()
    return token


def authenticate(session: Session, secret: str) -> ApiToken | None:
    """The live token whose secret this is, with its user; None if unknown or revoked."""
    # The shape check keeps junk away from the database; the lookup is by hash, so the
    # comparison never touches a secret and its timing says nothing about one.
    if not TOKEN_PATTERN.fullmatch(secret):
        return None
    return _live_token(session, hash_token(secret))


def _live_token(session: Session, token_hash: str) -> ApiToken | None:
    stmt = select(ApiToken).where(ApiToken.token_hash == token_hash)
    token = session.scalars(stmt).one_or_none()
    if token is None or token.revoked_at is not None:
        return None
    return token


@dataclass(frozen=True)
class _Cached:
    token: ApiToken  # detached, its user loaded
    expires: float  # time.monotonic()


class TokenCache:
    """Live tokens this process saw in the last ``ttl`` seconds, so most requests skip SQL.

    A revoked token keeps working at most ``ttl`` seconds in each process that saw it (the
    next look-up after that reads the row again); unknown and revoked tokens are never
    cached, so a new token works at once. ``ttl`` 0 looks every token up.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, _Cached] = {}

    def authenticate(self, session: Callable[[], Session], secret: str) -> ApiToken | None:
        """The live token whose secret this is, its user loaded; None if unknown or revoked.

        A cached token is a detached copy that every request of this process shares, with
        no query and no session: read it, never change it or add it to a session
        (``session.merge(token, load=False)`` gives a session its own copy without a query).
        Otherwise the row is read in ``session()``.
        """
        if not TOKEN_PATTERN.fullmatch(secret):
            return None
        digest = hash_token(secret)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached.expires > now:
            return cached.token
        token = _live_token(session(), digest)
        if token is None:
            self._entries.pop(digest, None)
        elif self.ttl > 0:
            self._remember(digest, token, now)
        return token

    def _remember(self, digest: str, token: ApiToken, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # a crude bound: it only costs look-ups
        self._entries[digest] = _Cached(_detached_copy(token), now + self.ttl)


def _detached_copy(token: ApiToken) -> ApiToken:
    """A copy of a token and its user that no session holds, for any later session to merge."""
    user = token.user
    user_copy = User(id=user.id, name=user.name, is_admin=user.is_admin,
                     created_at=user.created_at)  # fmt: skip
    copy = ApiToken(id=token.id, public_id=token.public_id, user_id=token.user_id,
                    token_hash=token.token_hash, created_at=token.created_at,
                    revoked_at=token.revoked_at)  # fmt: skip
    # Set as loaded without the backref: the user's token list stays unloaded, so a session
    # that merges the copy reads the user's tokens from the database, not a list of this one.
    set_committed_value(copy, "user", user_copy)
    # Detached with every attribute marked as loaded and unchanged, so merge(load=False) works.
    make_transient_to_detached(user_copy)
    make_transient_to_detached(copy)
    return copy


def has_users(session: Session) -> bool:
    """True once any user exists."""
    return session.scalars(select(User.id).limit(1)).first() is not None
