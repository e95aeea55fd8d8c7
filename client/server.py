"""``mnistq up | api | worker | db``: start the server parts, each imported only when started."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from shared.config import Settings

DEFAULT_WORKER_QUEUES = "cpu"
# How long `mnistq up` waits for its worker to hand its job back before killing it.
WORKER_STOP_SECONDS = 30
ADMIN_NAME = "admin"


@click.command("up")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to serve on")
@click.option("--port", default=8000, show_default=True, help="HTTP port")
def up_command(host: str, port: int) -> None:
    """Run the API and one worker together (SQLite, filesystem broker by default)."""
    from shared.config import get_settings
    from shared.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = get_settings()
    upgrade(settings.database_url)
    _bootstrap_admin(settings)
    # SIGTERM (docker, systemd) stops it like Ctrl-C; SIGINT is set explicitly because a
    # process started in the background inherits it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    # The worker runs the reaper and the other periodic duties in its main process.
    worker = _start_worker_process()
    try:
        _serve_api(settings, host, port)
    except KeyboardInterrupt:
        click.echo("mnistq: stopping", err=True)
    finally:
        _stop_worker_process(worker)


def _bootstrap_admin(settings: Settings) -> None:
    """On first start, create the admin user and print its token once; keep it for the CLI."""
    from shared.auth import create_user, has_users
    from shared.db import make_engine, make_session_factory

    path = settings.admin_token_path
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            if has_users(session):
                if path.exists():
                    click.echo(f"mnistq: the admin token is in {path}", err=True)
                return
            _user, issued = create_user(session, ADMIN_NAME, admin=True)
    finally:
        engine.dispose()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: there is no moment when others could read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(issued.secret + "\n")
    click.echo(f"mnistq: created user {ADMIN_NAME!r}; its token (shown once, kept in {path}):")
    click.echo(issued.secret)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _start_worker_process() -> subprocess.Popen[bytes]:
    """One Celery worker in its own process; it serves gpu too, so a cuda job fails clearly."""
    argv = [sys.executable, "-c", "from client.cli import main; main()", "worker"]
    return subprocess.Popen([*argv, "--queues", "cpu,gpu", "--concurrency", "1"])


def _stop_worker_process(worker: subprocess.Popen[bytes]) -> None:
    """Warm shutdown: the running job goes back to the queue; kill it if it hangs."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=WORKER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _serve_api(settings: Settings, host: str, port: int) -> None:
    from werkzeug.serving import make_server

    from api import create_app

    server = make_server(host, port, create_app(settings), threaded=True)
    base = f"http://{host}:{server.port}"
    click.echo(f"mnistq: dashboard on {base}/, API on {base}/api/v1 (Ctrl-C stops)", err=True)
    server.serve_forever()


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind")
@click.option("--port", default=8000, show_default=True, help="HTTP port")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes")
def api_command(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API with gunicorn's gevent workers (``api:create_app()``)."""
    from api.serving import prepare_metrics_dir
    from shared.config import get_settings

    # HTTP metrics are counted per worker process in files there and summed at each scrape.
    prepare_metrics_dir(get_settings().var_dir / "prometheus")
    argv = [
        sys.executable, "-m", "gunicorn", "--config", "python:api.serving",
        "--bind", f"{host}:{port}", "--workers", str(workers),
        "--access-logfile", "-", "api:create_app()",
    ]  # fmt: skip
    os.execv(sys.executable, argv)


@click.command("worker")
@click.option(
    "--queues", "-Q", default=DEFAULT_WORKER_QUEUES, show_default=True,
    help="comma-separated queues: cpu, gpu (GPU machines serve gpu)",
)  # fmt: skip
@click.option(
    "--concurrency", "-c", type=click.IntRange(min=1), default=None,
    help="jobs at once  [default: one per usable core when serving cpu, else 1]",
)  # fmt: skip
@click.option("--loglevel", default="INFO", show_default=True)
def worker_command(queues: str, concurrency: int | None, loglevel: str) -> None:
    """Run a Celery worker: one job per child process, fresh child for every job.

    Its main process also runs the reaper and the other periodic duties, so a deployment
    of `mnistq api` and any number of `mnistq worker` is complete.
    """
    from shared.config import usable_cores
    from worker.celery_main import app

    if concurrency is None:
        # One single-thread job per core gives the most jobs per hour on CPUs; a GPU is
        # shared best by one job at a time.
        concurrency = usable_cores() if "cpu" in queues.split(",") else 1
    argv = ["worker", "--queues", queues, "--concurrency", str(concurrency)]
    # A node name of its own (Celery's default, celery@host, repeats for every worker on a
    # machine): a control message for this worker, such as a drain's, reaches only it.
    argv += ["--hostname", f"mnistq-{os.getpid()}@%h"]
    # Each pool child serves job after job, each job in a fresh process forked from it
    # (worker.job_process): memory (and CUDA state) of one job never leaks into the next.
    argv += ["--loglevel", loglevel, "--prefetch-multiplier", "1"]
    app.worker_main(argv)


@click.group("db")
def db_group() -> None:
    """Database migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade_command(revision: str) -> None:
    """Apply migrations to MNISTQ_DATABASE_URL up to ``revision``."""
    from shared.config import get_settings
    from shared.migrate import upgrade

    upgrade(get_settings().database_url, revision)
    click.echo(f"database at {revision}")
