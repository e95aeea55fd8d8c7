"""``mnistq train``: one job in this process, no queue, no database."""

from __future__ import annotations

import click


@click.command("train")
def train_command() -> None:
    """Train one model in-process and write its artifacts to a folder."""
    raise click.ClickException("not implemented yet")
