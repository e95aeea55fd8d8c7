"""``mnistq submit | list | status | watch | cancel | download | predict``: the server's jobs."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, get_args

import click

from client.api import (
    AuthenticationFailed,
    Client,
    ClientError,
    Job,
    ValidationFailed,
)
from client.hyperparameters import hyperparameter_options, hyperparameters_from_flags
from shared.config import Settings, get_settings
from shared.schemas import JobStatusName

F = TypeVar("F", bound=Callable[..., Any])
# Exit statuses of `watch` (and `submit --watch`) beyond click's 1 (error) and 2 (usage).
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_CODES = {"failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED, "pruned": EXIT_CANCELLED}
BIG_FILE_BYTES = 1 << 20  # downloads from this size on get a progress bar


def stored_token(settings: Settings) -> str | None:
    """The token `mnistq up` kept in var/admin-token, if it is there and readable."""
    try:
        return settings.admin_token_path.read_text().strip() or None
    except OSError:
        return None


def make_client(url: str | None, token: str | None) -> Client:
    """A client for --url/--token, else MNISTQ_URL/MNISTQ_TOKEN, else `mnistq up`'s token."""
    settings = get_settings()
    secret = token or (settings.token.get_secret_value() if settings.token else None)
    return Client(url or settings.url, secret or stored_token(settings))


def describe(exc: ClientError) -> str:
    """One line that says what went wrong."""
    if isinstance(exc, ValidationFailed) and exc.fields:
        return f"invalid request: {'; '.join(exc.fields)}"
    if isinstance(exc, AuthenticationFailed):
        return f"{exc.message} (give a token with --token or MNISTQ_TOKEN)"
    if exc.status is not None and exc.status not in (404, 409, 503):
        return f"{exc.message} (HTTP {exc.status})"
    return exc.message


def server_command(func: F) -> F:
    """--url and --token, a ``client`` argument, and ClientErrors as one-line errors."""

    @click.option("--url", default=None, help="server URL (default: MNISTQ_URL or localhost:8000)")
    @click.option(
        "--token", default=None, help="API token (default: MNISTQ_TOKEN, var/admin-token)"
    )
    @functools.wraps(func)
    def wrapper(url: str | None, token: str | None, **kwargs: Any) -> Any:
        try:
            return func(make_client(url, token), **kwargs)
        except ClientError as exc:
            raise click.ClickException(describe(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _resume(value: str | None) -> tuple[str | None, int | None]:
    """JOB or JOB:EPOCH."""
    if not value:
        return None, None
    job_id, _, epoch = value.partition(":")
    if epoch and not epoch.isdigit():
        raise click.BadParameter("must be JOB or JOB:EPOCH", param_hint="--resume-from")
    return job_id, int(epoch) if epoch else None


@click.command("submit")
@hyperparameter_options
@click.option("--name", default=None, help="a label for the job")
@click.option("--resume-from", default=None, metavar="JOB[:EPOCH]",
              help="continue from that job's checkpoint (default: its newest)")  # fmt: skip
@click.option("--priority", type=click.IntRange(-100, 100), default=None,
              help="larger runs first (-100..100, default 0)")  # fmt: skip
@click.option("--watch", is_flag=True, help="follow the job until it ends")
@server_command
def submit_command(
    client: Client,
    name: str | None,
    resume_from: str | None,
    priority: int | None,
    watch: bool,
    **flags: Any,
) -> None:
    """Submit a training job to the server; prints its id."""
    hp = hyperparameters_from_flags({}, flags)
    job_id, epoch = _resume(resume_from)
    # Only the flags given are sent: the rest take the server's defaults.
    hyperparameters = hp.model_dump(mode="json", exclude_unset=True)
    job = client.submit(
        hyperparameters, name=name, resume_from=job_id, resume_epoch=epoch, priority=priority
    )
    click.echo(job.id)
    if watch:
        _watch(client, job.id)


def _cell(job: Job) -> list[str]:
    accuracy = "-" if job.test_accuracy is None else f"{job.test_accuracy:.2%}"
    created = job.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    progress = f"{job.progress.fraction:.0%}"
    return [job.id, job.name or "-", job.status, progress, accuracy, created]


def table(rows: list[list[str]], header: list[str]) -> str:
    """Rows as left-aligned columns under a header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))
    return "\n".join(line.rstrip() for line in [head, *lines])


@click.command("list")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(get_args(JobStatusName)),
              help="only jobs in this state (repeat for several)")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True,
              help="how many jobs, newest first")  # fmt: skip
@server_command
def list_command(client: Client, statuses: tuple[str, ...], limit: int) -> None:
    """Jobs, newest first: id, name, status, progress, accuracy, created."""
    page = client.list(status=statuses, limit=limit)
    header = ["ID", "NAME", "STATUS", "PROGRESS", "ACCURACY", "CREATED (UTC)"]
    click.echo(table([_cell(job) for job in page.items], header))


def summary(job: Job) -> str:
    """A job as a few readable lines."""
    p = job.progress
    lines = [
        f"job       {job.id}" + (f" ({job.name})" if job.name else ""),
        f"status    {job.status}" + (" (cancel requested)" if job.cancel_requested else ""),
        f"progress  epoch {p.epoch}/{p.n_epochs}, step {p.step}/{p.steps_per_epoch}, "
        f"{p.fraction:.0%}" + (f", ETA {_duration(p.eta_seconds)}" if p.eta_seconds else ""),
    ]
    if job.status == "queued" and job.queue_status is not None:
        lines.append(f"queue     {queue_text(job)}")
    if job.test_accuracy is not None:
        lines.append(f"result    test loss {job.test_loss:.4f}, accuracy {job.test_accuracy:.2%}")
    hp = ", ".join(f"{k}={v}" for k, v in job.hyperparameters.items())
    lines += [f"params    {hp}", f"device    {job.device_used or job.device_requested}"]
    if job.error is not None and job.error.message:
        lines.append(f"error     {job.error.message}")
    if job.artifacts:
        lines.append(f"artifacts {', '.join(a.name for a in job.artifacts)}")
    return "\n".join(lines)


@click.command("status")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="the job's JSON as the server sends it")
@server_command
def status_command(client: Client, job_id: str, as_json: bool) -> None:
    """Show one job: state, progress, results, error, artifacts."""
    job = client.get(job_id)
    if as_json:
        click.echo(json.dumps(job.model_dump(mode="json", by_alias=True), indent=2))
    else:
        click.echo(summary(job))


def queue_text(job: Job) -> str:
    """'queued: position N, M live workers', or why the job may wait forever."""
    waiting = job.queue_status
    if waiting is None:
        return "queued"
    if waiting.message:
        return f"queued: {waiting.message}"
    workers = (
        "1 live worker" if waiting.live_workers == 1 else f"{waiting.live_workers} live workers"
    )
    return f"queued: position {waiting.position}, {workers}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Watcher:
    """Draws a job as it runs: its queue place, then one tqdm bar per epoch."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.epoch = 0
        self.queued_line = ""

    def update(self, job: Job) -> None:
        """Show the job's latest state."""
        if job.status == "queued":
            self._queued(job)
        elif job.progress.steps_per_epoch > 0:
            self._progress(job)

    def _queued(self, job: Job) -> None:
        line = queue_text(job)
        if line != self.queued_line:  # only changes, not one line per poll
            self.close()
            click.echo(line, err=True)
            self.queued_line = line

    def _progress(self, job: Job) -> None:
        from tqdm import tqdm

        p = job.progress
        if p.epoch != self.epoch or self.bar is None:
            self.close(finished=self.bar is not None)  # a new epoch: the last one is complete
            self.epoch = p.epoch
            desc = f"epoch {max(p.epoch, 1)}/{p.n_epochs}"
            # initial: a bar joined mid-epoch does not count the batches done as one burst.
            self.bar = tqdm(total=p.steps_per_epoch, initial=min(p.step, p.steps_per_epoch),
                            desc=desc, unit="batch", file=sys.stderr)  # fmt: skip
        self.bar.n = min(p.step, p.steps_per_epoch)
        self.bar.set_postfix_str(self._postfix(job), refresh=False)
        self.bar.refresh()

    @staticmethod
    def _postfix(job: Job) -> str:
        p = job.progress
        parts = [f"loss {job.train_loss:.4f}" if job.train_loss is not None else "loss -"]
        if job.test_metrics and job.test_metrics[-1].accuracy is not None:
            parts.append(f"acc {job.test_metrics[-1].accuracy:.2%}")
        if p.samples_per_second:
            parts.append(f"{p.samples_per_second:,.0f} img/s")
        if p.eta_seconds is not None:
            parts.append(f"ETA {_duration(p.eta_seconds)}")
        return " ".join(parts)

    def close(self, *, finished: bool = False) -> None:
        """Finish the current bar, if any; ``finished`` fills it first."""
        if self.bar is not None:
            if finished:
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()
            self.bar = None


def final_line(job: Job) -> str:
    """How the job ended, with its final metrics or its error."""
    if job.status == "succeeded":
        loss = "-" if job.test_loss is None else f"{job.test_loss:.4f}"
        accuracy = "-" if job.test_accuracy is None else f"{job.test_accuracy:.2%}"
        return (
            f"succeeded after {job.progress.epoch} epoch(s): test loss {loss}, accuracy {accuracy}"
        )
    if job.status == "failed":
        reason = job.error.message if job.error and job.error.message else "no reason recorded"
        return f"failed: {reason}"
    if job.status == "pruned":
        return f"pruned by its sweep after {len(job.test_metrics)} epoch(s)"
    return f"{job.status}"


def _watch(client: Client, job_id: str, poll: float = 0.5) -> None:
    """Follow the job's events to its end; exit non-zero unless it succeeded."""
    watcher = Watcher()
    try:
        job = client.follow(job_id, on_update=watcher.update, poll=poll)
    finally:
        watcher.close()
    click.echo(final_line(job))
    exit_as(job.status)


def exit_as(status: str) -> None:
    """End a watch with the exit status of how the job or sweep ended (0: succeeded)."""
    if status in EXIT_CODES:
        sys.exit(EXIT_CODES[status])


@click.command("watch")
@click.argument("job_id")
@click.option("--poll", type=click.FloatRange(min=0.1), default=0.5, show_default=True,
              help="seconds between polls where the event stream is not available")  # fmt: skip
@server_command
def watch_command(client: Client, job_id: str, poll: float) -> None:
    """Follow a job with a bar per epoch; exit 0 if it succeeded, 3 failed, 4 cancelled/pruned."""
    _watch(client, job_id, poll)


@click.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="go on printing new lines until the job ends")
@server_command
def logs_command(client: Client, job_id: str, follow: bool) -> None:
    """Print a job's log: the seed's train and test lines and what happened to the job."""
    if follow:
        for line in client.follow_logs(job_id):
            click.echo(line.message)
        return
    after = 0
    while True:
        page = client.logs(job_id, after=after)
        for line in page.lines:
            click.echo(line.message)
        if page.complete or not page.lines:
            return
        after = page.next_after


@click.command("cancel")
@click.argument("job_id")
@server_command
def cancel_command(client: Client, job_id: str) -> None:
    """Cancel a queued job now, or ask a running one to stop."""
    job = client.cancel(job_id)
    click.echo(f"{job.id} {'cancelled' if job.status == 'cancelled' else 'cancel requested'}")


class _DownloadBars:
    """A tqdm bar for each large file being downloaded."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if total < BIG_FILE_BYTES:
            return
        if name not in self.bars:
            self.bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True,
                                   file=sys.stderr)  # fmt: skip
        bar = self.bars[name]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


@click.command("download")
@click.argument("job_id")
@click.argument("names", nargs=-1)
@click.option("-o", "--out", "dest", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True, help="folder to write into")  # fmt: skip
@server_command
def download_command(client: Client, job_id: str, names: tuple[str, ...], dest: Path) -> None:
    """Download a job's artifacts (all unless NAMEs are given), each checked by sha256."""
    paths = client.download(job_id, list(names) or None, dest, on_progress=_DownloadBars())
    for path in paths:
        click.echo(str(path))


@click.command("predict")
@click.argument("job_id")
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@server_command
def predict_command(client: Client, job_id: str, image: Path) -> None:
    """Classify a PNG or JPEG of a digit with a succeeded job's model."""
    prediction = client.predict(job_id, image.read_bytes())
    confidence = prediction.probabilities[prediction.digit]
    click.echo(f"{prediction.digit} ({confidence:.1%})")


@click.command("priority", context_settings={"ignore_unknown_options": True})
@click.argument("job_id")
@click.argument("priority", type=click.IntRange(-100, 100))
@server_command
def priority_command(client: Client, job_id: str, priority: int) -> None:
    """Change a queued job's priority (larger runs first)."""
    job = client.set_priority(job_id, priority)
    click.echo(f"{job.id}: priority {job.priority}, {queue_text(job) or job.status}")


def _age(when: datetime) -> str:
    return _duration((datetime.now(UTC) - when).total_seconds())


@click.command("workers")
@click.argument("action", required=False, type=click.Choice(["list", "drain"]), default="list")
@click.argument("worker_id", required=False)
@server_command
def workers_command(client: Client, action: str, worker_id: str | None) -> None:
    """Workers seen in the last hour; `mnistq workers drain ID` drains one (admins only).

    A draining worker finishes what it runs, takes nothing new, and exits.
    """
    if action == "drain":
        if worker_id is None:
            raise click.UsageError("mnistq workers drain needs the worker's ID (mnistq workers)")
        worker = client.drain_worker(worker_id)
        click.echo(f"{worker.id} on {worker.hostname}: {worker.state}")
        return
    rows = [
        [w.id, w.hostname, str(w.pid), ",".join(w.queues), str(w.slots),
         ",".join(w.jobs) or "-", f"{_age(w.last_seen_at)} ago", w.state]
        for w in client.workers()
    ]  # fmt: skip
    header = ["ID", "HOST", "PID", "QUEUES", "SLOTS", "JOBS", "LAST SEEN", "STATE"]
    click.echo(table(rows, header))


@click.command("queues")
@server_command
def queues_command(client: Client) -> None:
    """Queues: jobs queued and running, the oldest wait, live workers."""
    rows = [
        [q.name, str(q.queued), str(q.running),
         _duration(q.oldest_wait_seconds),
         str(q.live_workers)]
        for q in client.queues()
    ]  # fmt: skip
    click.echo(table(rows, ["QUEUE", "QUEUED", "RUNNING", "OLDEST WAIT", "LIVE WORKERS"]))


COMMANDS = [
    submit_command,
    list_command,
    status_command,
    watch_command,
    logs_command,
    cancel_command,
    download_command,
    predict_command,
    priority_command,
    workers_command,
    queues_command,
]
