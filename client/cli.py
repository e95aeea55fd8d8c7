"""The ``mnistq`` command line: one group, each subcommand importing what it starts lazily."""

from __future__ import annotations

import click

from client.commands import COMMANDS
from client.server import api_command, db_group, up_command, worker_command
from client.sweeps import sweep_group
from client.train import train_command
from client.users import tokens_group, users_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnistq")
def cli() -> None:
    """mnistq: train MNIST models from an HTTP request."""


cli.add_command(train_command)
cli.add_command(up_command)
cli.add_command(api_command)
cli.add_command(worker_command)
cli.add_command(db_group)
cli.add_command(users_group)
cli.add_command(tokens_group)
cli.add_command(sweep_group)
for command in COMMANDS:
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()
