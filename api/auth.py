"""Bearer-token authentication: every route needs a live token unless it is marked public."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, g, request
from sqlalchemy import inspect

from api import dashboard_session
from api.db import get_session
from api.errors import ApiError
from api.extensions import KEY as SERVICES_KEY
from shared.auth import TokenCache
from shared.models import ApiToken, User

F = TypeVar("F", bound=Callable[..., Any])
REALM = 'Bearer realm="mnistq"'
MAX_HEADER_LENGTH = 512
TOKENS_KEY = "mnistq.tokens"


def public(view: F) -> F:
    """Mark a view as open to callers without a token (health, the API's documentation)."""
    view.public = True  # type: ignore[attr-defined]
    return view


def public_when(setting: str) -> Callable[[F], F]:
    """Mark a view as open to callers without a token when the boolean ``setting`` is on."""

    def mark(view: F) -> F:
        view.public_when = setting  # type: ignore[attr-defined]
        return view

    return mark


def is_public(view: Callable[..., Any]) -> bool:
    """True for views marked with @public, or @public_when a setting that is on."""
    setting = getattr(view, "public_when", None)
    if setting is not None:
        return bool(getattr(current_app.extensions["mnistq"].settings, setting))
    return bool(getattr(view, "public", False))


def init_app(app: Flask) -> None:
    """Check the token of every request to a non-public route before the view runs."""
    ttl = app.extensions[SERVICES_KEY].settings.token_cache_seconds
    app.extensions[TOKENS_KEY] = TokenCache(ttl)
    app.before_request(require_token)


def require_token() -> None:
    """Load the caller's token and user into ``g``; 401 if there is no live token."""
    view = current_app.view_functions.get(request.endpoint or "")
    # No view: the request 404s or 405s anyway. OPTIONS: a CORS preflight carries no token.
    # Static files are the dashboard's CSS and scripts: nothing secret, needed to sign in.
    if view is None or is_public(view) or request.method == "OPTIONS":
        return
    if request.endpoint == "static":
        return
    authenticate_request()


def authenticate_request() -> None:
    """The caller's live token, put into ``g``; 401 if there is none."""
    token = _session_token() or _tokens().authenticate(get_session, _bearer_secret())
    if token is None:
        raise _unauthorized("invalid_token", "the token is unknown or revoked")
    # Most often the token cache's shared copy: views read it as it is (``caller()``), and
    # only one that loads more of the user merges it into the session (``current_user()``).
    g.api_token = token


def _tokens() -> TokenCache:
    cache: TokenCache = current_app.extensions[TOKENS_KEY]
    return cache


def _session_token() -> ApiToken | None:
    """The dashboard's own reads of the JSON API ride on its signed-in session."""
    if not dashboard_session.session_may_authenticate():
        return None
    return dashboard_session.session_token()


def _bearer_secret() -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(
            401,
            "authentication_required",
            "this route needs the header Authorization: Bearer <token>",
            headers={"WWW-Authenticate": REALM},
        )
    scheme, _, secret = header.partition(" ")
    # The scheme is case-insensitive (RFC 9110); the token is a single word.
    if scheme.lower() != "bearer" or not secret.strip() or len(header) > MAX_HEADER_LENGTH:
        raise _unauthorized(
            "invalid_token", "the Authorization header must be 'Bearer <token>' with one token"
        )
    return secret.strip()


def _unauthorized(code: str, message: str) -> ApiError:
    header = f'{REALM}, error="invalid_token"'
    return ApiError(401, code, message, headers={"WWW-Authenticate": header})


def current_user() -> User:
    """The user the request's token belongs to, in the request's session (for views that
    load more of it, such as its tokens)."""
    token: ApiToken = g.api_token
    if inspect(token).detached:  # the token cache's copy: this request gets its own
        token = g.api_token = get_session().merge(token, load=False)
    return token.user


def caller() -> ApiToken:
    """The request's token as authenticated, its user loaded: read it, never change it (it
    may be the token cache's copy, which every request of this process shares)."""
    token: ApiToken = g.api_token
    return token


def owner_scope() -> int | None:
    """Whose jobs the caller may see: their own id, or None (all jobs) for an admin."""
    user = caller().user
    return None if user.is_admin else user.id


def require_admin() -> None:
    """403 unless the caller is an admin."""
    if not caller().user.is_admin:
        raise ApiError(403, "forbidden", "only an admin may do this")
