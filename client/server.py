"""``mnistq up | api | worker | db``: start the server parts."""

from __future__ import annotations

import click


@click.command("up")
def up_command() -> None:
    """Run the API and one worker in one process tree (SQLite, filesystem broker)."""
    raise click.ClickException("not implemented yet")


@click.command("api")
def api_command() -> None:
    """Serve the HTTP API with gunicorn."""
    raise click.ClickException("not implemented yet")


@click.command("worker")
def worker_command() -> None:
    """Run a Celery worker."""
    raise click.ClickException("not implemented yet")


@click.group("db")
def db_group() -> None:
    """Database migrations."""
