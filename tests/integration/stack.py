"""The running system for integration tests: API and worker processes, an HTTP client."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.auth import create_user
from shared.db import make_engine, make_session_factory
from tests.integration.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
MAX_TRAIN_BATCHES = 100
CLI = [sys.executable, "-c", "from client.cli import main; main()"]


class Process:
    """One ``mnistq`` subprocess in its own session, so it can be killed with its children."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> None:
        self.args, self.env, self.log, self.cwd = args, env, log, cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        """Start it, appending its output to the log file."""
        out = self.log.open("ab")
        self.popen = subprocess.Popen(
            [*CLI, *self.args], env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        return self

    def kill(self) -> None:
        """SIGKILL the process and every child it has: a machine gone, no goodbyes. Its
        session's other processes too when it has exited already, so that none outlives it."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):  # nothing of its session is left
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def terminate(self, timeout: float = 30, signum: int = signal.SIGTERM) -> int:
        """Signal the main process (SIGTERM, as docker stop does) and wait for it to exit."""
        assert self.popen is not None
        self.popen.send_signal(signum)
        try:
            return self.popen.wait(timeout=timeout)
        finally:
            self.kill()

    def tail(self, chars: int = 3000, *, requests: bool = True) -> str:
        """The end of its log, for failure messages; ``requests=False`` leaves out the HTTP
        access lines, which would fill it while a test polls."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if not requests:
            text = "\n".join(line for line in text.splitlines() if " werkzeug: " not in line)
        return text[-chars:]


def stack_env(
    *, database_url: str, broker_url: str, var_dir: Path, data_dir: Path
) -> dict[str, str]:
    """MNISTQ_* for every process of the test stack: short leases so failures show fast."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")}
    env.update(
        MNISTQ_DATABASE_URL=database_url,
        MNISTQ_BROKER_URL=broker_url,
        MNISTQ_VAR_DIR=str(var_dir),
        MNISTQ_ARTIFACT_DIR=str(var_dir / "artifacts"),
        MNISTQ_SCRATCH_DIR=str(var_dir / "scratch"),
        MNISTQ_DATA_DIR=str(data_dir),
        MNISTQ_DOWNLOAD_MNIST="false",
        MNISTQ_LEASE_SECONDS="4",
        MNISTQ_HEARTBEAT_SECONDS="1",
        MNISTQ_REAPER_INTERVAL_SECONDS="1",
        # A queued job whose message was lost (Redis restarted empty) is published again
        # this long after its last publication.
        MNISTQ_REQUEUE_GRACE_SECONDS="8",
        # Fault tests submit in bursts; the per-token limit has tests of its own.
        MNISTQ_SUBMIT_RATE_LIMIT="1000/minute",
        # Epochs of at most 100 batches keep every run short.
        MNISTQ_MAX_TRAIN_BATCHES=str(MAX_TRAIN_BATCHES),
        # Webhook receivers of the tests listen on loopback; failed tries are retried fast.
        MNISTQ_WEBHOOK_ALLOW_PRIVATE="true",
        MNISTQ_WEBHOOK_RETRY_SECONDS="[0.2, 0.2, 0.2, 0.2, 0.2]",
    )
    return env


class Api:
    """``mnistq api`` (gunicorn) or ``mnistq up`` on a free port, and a JSON client for it."""

    def __init__(self, env: dict[str, str], log: Path, command: str = "api") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [command, "--port", str(self.port)]
        if command == "api":
            args += ["--workers", "1"]
        self.process = Process(args, env, log)
        self.http = requests.Session()
        self.command, self.env = command, env

    def start(self) -> Api:
        """Start gunicorn and wait until it answers; every request then carries an admin token."""
        self.process.start()
        wait_for_port(self.port, timeout=30)
        self.http.headers["Authorization"] = f"Bearer {self.admin_token()}"
        return self

    def admin_token(self) -> str:
        """`mnistq up` made one on its first start; for `mnistq api` make one in its database."""
        if self.command == "up":
            return (Path(self.env["MNISTQ_VAR_DIR"]) / "admin-token").read_text().strip()
        engine = make_engine(self.env["MNISTQ_DATABASE_URL"])
        try:
            with make_session_factory(engine)() as session:
                _user, issued = create_user(session, f"admin-{secrets.token_hex(4)}", admin=True)
                return issued.secret
        finally:
            engine.dispose()

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST a job; it must be accepted."""
        response = self.http.post(f"{self.base}/api/v1/jobs", json=body, timeout=10)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def get(self, path: str) -> Any:
        """GET a JSON document under /api/v1."""
        response = self.http.get(f"{self.base}/api/v1{path}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's JSON."""
        return dict(self.get(f"/jobs/{job_id}"))

    def wait(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90
    ) -> dict[str, Any]:
        """Poll the job every 0.1 s until ``until(job)``; fail with its state after ``timeout``."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while not until(job):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} did not get there in {timeout}s: {job}")
            time.sleep(0.1)
            job = self.job(job_id)
        return job

    def log_lines(self, job_id: str) -> list[dict[str, Any]]:
        """Every line of the job's log, page after page."""
        lines: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.get(f"/jobs/{job_id}/logs?after={after}&limit=50")
            lines += page["lines"]
            if page["complete"] or not page["lines"]:
                return lines
            after = page["next_after"]

    def wait_finished(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled."""
        finished = ("succeeded", "failed", "cancelled")
        return self.wait(job_id, lambda job: job["status"] in finished, timeout)
