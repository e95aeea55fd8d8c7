"""Routes of users: who the caller is, and (admins only) who may call the API."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from api.auth import current_user, require_admin
from api.db import get_session
from api.openapi import operation
from api.serialize import dump, utc
from shared.auth import list_users
from shared.models import User
from shared.schemas import TokenOut, UserListOut, UserOut

bp = Blueprint("users", __name__, url_prefix="/api/v1")


def user_out(user: User) -> UserOut:
    """A user with the public ids of their tokens."""
    tokens = [
        TokenOut(id=t.public_id, created_at=utc(t.created_at), revoked_at=utc(t.revoked_at))
        for t in user.tokens
    ]
    return UserOut(
        name=user.name, is_admin=user.is_admin, created_at=utc(user.created_at), tokens=tokens
    )


@bp.get("/me")
@operation(summary="The caller's user", responses={200: UserOut}, errors=(503,))
def me() -> ResponseReturnValue:
    """Name, role and tokens of the user whose token came with the request."""
    return dump(user_out(current_user()))


@bp.get("/users")
@operation(summary="List users (admins only)", responses={200: UserListOut}, errors=(403, 503))
def index() -> ResponseReturnValue:
    """Every user with their tokens' public ids; 403 for anyone but an admin."""
    require_admin()
    return dump(UserListOut(items=[user_out(u) for u in list_users(get_session())]))
