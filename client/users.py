"""``mnistq users | tokens``: manage who may call the API, straight in the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@contextmanager
def _session() -> Iterator[Session]:
    """A session on MNISTQ_DATABASE_URL, migrated first so a fresh database works too."""
    from shared.config import get_settings
    from shared.db import make_engine, make_session_factory
    from shared.migrate import upgrade

    url = get_settings().database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group("users")
def users_group() -> None:
    """Users of the API."""


@users_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="may see and manage every user's jobs")
def users_create_command(name: str, admin: bool) -> None:
    """Create a user; its first token is printed once, as the last line."""
    from shared.auth import InvalidUserName, UserExists, create_user

    with _session() as session:
        try:
            user, issued = create_user(session, name, admin=admin)
        except (UserExists, InvalidUserName) as exc:
            raise _fail(exc) from exc
        role = "admin" if user.is_admin else "user"
        click.echo(f"created {role} {user.name!r}, token id {issued.token.public_id}")
        click.echo("the token is shown only now; keep it secret:", err=True)
        click.echo(issued.secret)


@users_group.command("list")
def users_list_command() -> None:
    """Every user with its role and its tokens' ids (revoked ones marked)."""
    from shared.auth import list_users

    with _session() as session:
        for user in list_users(session):
            tokens = " ".join(
                t.public_id + (" (revoked)" if t.revoked_at else "") for t in user.tokens
            )
            role = "admin" if user.is_admin else "user"
            click.echo(f"{user.name}\t{role}\t{tokens or '-'}")


@click.group("tokens")
def tokens_group() -> None:
    """API tokens of users."""


@tokens_group.command("create")
@click.argument("user")
def tokens_create_command(user: str) -> None:
    """Give USER another token, printed once as the last line."""
    from shared.auth import UserNotFound, create_token

    with _session() as session:
        try:
            issued = create_token(session, user)
        except UserNotFound as exc:
            raise _fail(exc) from exc
        click.echo(f"token id {issued.token.public_id} for {user!r}")
        click.echo(issued.secret)


@tokens_group.command("revoke")
@click.argument("token_id")
def tokens_revoke_command(token_id: str) -> None:
    """Revoke the token with this id (from `mnistq users list`); it stops working at once."""
    from shared.auth import TokenNotFound, revoke_token

    with _session() as session:
        try:
            token = revoke_token(session, token_id)
        except TokenNotFound as exc:
            raise _fail(exc) from exc
        click.echo(f"revoked token {token.public_id} of {token.user.name!r}")
