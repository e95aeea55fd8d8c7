"""The dashboard's browser session: the signing key, sign-in and sign-out, and CSRF tokens."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from flask import Flask, Request, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from sqlalchemy.orm import Session

from api.db import get_session
from api.errors import ApiError
from api.extensions import services
from shared.auth import authenticate
from shared.config import Settings
from shared.models import ApiToken
from shared.sessions import end_session, find_session, start_session

SESSION_KEY = "sid"
CSRF_KEY = "csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values for requests the dashboard itself made (or a person typed the URL).
OWN_SITES = frozenset({"same-origin", "none"})


def secret_key(settings: Settings) -> str:
    """The configured key, else the one kept in var_dir, made on first use."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    return _stored_key(settings.secret_key_path)


def _stored_key(path: Path) -> str:
    """Read the key file, creating it atomically if missing, so every worker shares one key."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
        try:
            # link() fails if another process won the race; then its key is the key.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


class _CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, with no signer built for a request without the cookie
    (every API client's): its session is a new, empty one either way."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def init_app(app: Flask, settings: Settings) -> None:
    """Give ``app`` its signing key and a cookie scripts cannot read, sent same-site only."""
    app.secret_key = secret_key(settings)
    app.session_interface = _CookieSessions()
    app.config.update(
        SESSION_COOKIE_NAME="mnistq_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        # The browser drops the cookie when the server would end the session anyway.
        PERMANENT_SESSION_LIFETIME=settings.session_idle,
    )


def sign_in(secret: str) -> ApiToken | None:
    """Start a session for the live token ``secret``; None (and no session) otherwise."""
    db = get_session()
    token = authenticate(db, secret.strip())
    if token is None:
        return None
    _end_current(db)
    # A fresh session on sign-in: nothing from before (a planted CSRF token) carries over.
    session.clear()
    session.permanent = True
    # A random id whose hash alone is stored: neither the secret nor anything in the
    # database is in the cookie, so a copy of the database cannot be turned into one.
    session[SESSION_KEY] = start_session(db, token, services().settings.session_idle)
    return token


def sign_out() -> None:
    """End the session here and in the database: a copied cookie stops working too."""
    _end_current(get_session())
    session.clear()


def _end_current(db: Session) -> None:
    session_id = session.get(SESSION_KEY)
    if isinstance(session_id, str):
        end_session(db, session_id)


def session_token() -> ApiToken | None:
    """The live token of this browser's session; None if none, ended, idle or revoked."""
    session_id = session.get(SESSION_KEY)
    if not isinstance(session_id, str):
        return None
    return find_session(get_session(), session_id, services().settings.session_idle)


def session_may_authenticate() -> bool:
    """True for a same-origin read without a bearer token: the dashboard's own JSON fetches."""
    if request.method not in SAFE_METHODS or "Authorization" in request.headers:
        return False
    return request.headers.get("Sec-Fetch-Site", "same-origin") in OWN_SITES


def csrf_token() -> str:
    """The session's CSRF token, made on first use; forms and scripts send it back."""
    token = session.get(CSRF_KEY)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_KEY] = token
    return token


def check_csrf() -> None:
    """400 unless a state-changing request carries the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    expected = session.get(CSRF_KEY)
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    # Bytes, not str: compare_digest raises on a str that is not ASCII, and anyone may send one.
    if not isinstance(expected, str) or not hmac.compare_digest(
        expected.encode(), sent.encode(errors="replace")
    ):
        raise ApiError(
            400, "csrf_failed", "the form is stale or was not sent by this dashboard; reload it"
        )
