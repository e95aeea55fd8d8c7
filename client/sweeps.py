"""``mnistq sweep create | list | status | watch | cancel``: hyperparameter sweeps."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from typing import Any, get_args

import click

from client.api import Client, Sweep, Trial
from client.commands import exit_as, server_command, table
from shared.sweep_schemas import SweepStatusName


@click.group("sweep")
def sweep_group() -> None:
    """Hyperparameter sweeps: many trial jobs from one spec, the best at the end."""


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"cannot read a JSON sweep spec: {exc}", param_hint="SPEC"
        ) from exc
    if not isinstance(spec, dict):
        raise click.BadParameter("the sweep spec must be a JSON object", param_hint="SPEC")
    return spec


@sweep_group.command("create")
@click.argument("spec", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--watch", is_flag=True, help="follow the sweep until it ends")
@click.option("--idempotency-key", default=None, help="repeat the creation safely")
@server_command
def create_command(client: Client, spec: Path, watch: bool, idempotency_key: str | None) -> None:
    """Start a sweep from a JSON spec (the W&B sweep grammar); prints its id."""
    sweep = client.create_sweep(_read_spec(spec), idempotency_key=idempotency_key)
    click.echo(sweep.id)
    if watch:
        _watch(client, sweep.id)


def best_text(sweep: Sweep) -> str:
    """The best trial so far, in a few words."""
    best = sweep.best
    if best is None:
        return "-"
    searched = {k: best.hyperparameters.get(k) for k in sweep.parameters if _varies(sweep, k)}
    values = ", ".join(f"{k}={_short(v)}" for k, v in searched.items())
    return f"#{best.trial_number} {sweep.metric.name} {best.value:.4f} ({values})"


def _varies(sweep: Sweep, name: str) -> bool:
    return bool(sweep.parameters[name].get("distribution") != "constant")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_text(sweep: Sweep) -> str:
    """'3/16 trials: 2 running, 1 succeeded, ...'."""
    counts = sweep.counts.model_dump()
    states = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return f"{sweep.trials}/{sweep.budget.max_trials} trials" + (f": {states}" if states else "")


def summary(sweep: Sweep) -> str:
    """A sweep as a few readable lines."""
    lines = [
        f"sweep     {sweep.id}" + (f" ({sweep.name})" if sweep.name else ""),
        f"status    {sweep.status}",
        f"search    {sweep.method}, {sweep.metric.goal} {sweep.metric.name}"
        + (f", {sweep.early_terminate.type} early stopping" if sweep.early_terminate else ""),
        f"trials    {progress_text(sweep)}",
        f"best      {best_text(sweep)}",
    ]
    if sweep.error:
        lines.append(f"error     {sweep.error}")
    return "\n".join(lines)


def trials_table(sweep: Sweep, trials: list[Trial]) -> str:
    """The trials, best first, with their searched values, metric and epochs."""
    names = [n for n in sweep.parameters if _varies(sweep, n)]
    rows = [
        [str(t.trial_number), t.job.status, *(_short(t.params.get(n)) for n in names),
         "-" if t.value is None else f"{t.value:.4f}", str(t.epochs_trained), t.job.id]
        for t in trials
    ]  # fmt: skip
    return table(rows, ["#", "STATUS", *(n.upper() for n in names), "METRIC", "EPOCHS", "JOB"])


@sweep_group.command("list")
@click.option("--status", "statuses", multiple=True, type=click.Choice(get_args(SweepStatusName)),
              help="only sweeps in this state (repeat for several)")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@server_command
def list_command(client: Client, statuses: tuple[str, ...], limit: int) -> None:
    """Sweeps, newest first: id, name, status, method, trials, best."""
    rows = [
        [s.id, s.name or "-", s.status, s.method, f"{s.trials}/{s.budget.max_trials}",
         best_text(s), s.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")]
        for s in client.sweeps(status=statuses, limit=limit)
    ]  # fmt: skip
    header = ["ID", "NAME", "STATUS", "METHOD", "TRIALS", "BEST", "CREATED (UTC)"]
    click.echo(table(rows, header))


@sweep_group.command("status")
@click.argument("sweep_id")
@click.option("--json", "as_json", is_flag=True, help="the sweep's JSON as the server sends it")
@server_command
def status_command(client: Client, sweep_id: str, as_json: bool) -> None:
    """Show one sweep and its trials, best first."""
    sweep = client.sweep(sweep_id)
    if as_json:
        click.echo(json.dumps(sweep.model_dump(mode="json", by_alias=True), indent=2))
        return
    click.echo(summary(sweep))
    click.echo()
    click.echo(trials_table(sweep, client.sweep_trials(sweep_id)))


def _watch(client: Client, sweep_id: str, poll: float = 2.0) -> None:
    """Follow the sweep: a line each time its trials or best change; the table at the end."""
    last = ""

    def update(sweep: Sweep) -> None:
        nonlocal last
        line = f"{progress_text(sweep)} | best {best_text(sweep)}"
        if line != last:
            click.echo(line, err=True)
            last = line

    sweep = client.wait_sweep(sweep_id, on_update=update, poll=poll)
    click.echo(summary(sweep))
    click.echo(trials_table(sweep, client.sweep_trials(sweep_id)))
    exit_as(sweep.status)


@sweep_group.command("watch")
@click.argument("sweep_id")
@click.option("--poll", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="seconds between polls")  # fmt: skip
@server_command
def watch_command(client: Client, sweep_id: str, poll: float) -> None:
    """Follow a sweep's trials and best so far; exit 0 completed, 3 failed, 4 cancelled."""
    _watch(client, sweep_id, poll)


@sweep_group.command("cancel")
@click.argument("sweep_id")
@server_command
def cancel_command(client: Client, sweep_id: str) -> None:
    """Cancel a sweep: queued trials now, running ones at their next heartbeat."""
    sweep = client.cancel_sweep(sweep_id)
    click.echo(f"{sweep.id} {sweep.status}")
