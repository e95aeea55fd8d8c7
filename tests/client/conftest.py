"""A running mnistq for client tests: gunicorn API, one Celery worker, Redis and PostgreSQL.

The services come from the integration fixtures; the stack gets a database and a Redis
database number of its own, so its worker never takes another test's jobs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from client.api import Client, Job
from tests.integration.conftest import RedisServer, make_pg_database, redis_server
from tests.integration.stack import CLI, ROOT, Api, Process, stack_env

__all__ = ["make_pg_database", "redis_server"]  # fixtures used from this package

REDIS_DB = 7  # integration stacks use database 0 of the same server
# Reaches ≥ 0.93 test accuracy within the stack's 100 batches per epoch.
ACCURATE = {"batch_size_train": 128, "optimizer": "adam", "learning_rate": 0.003, "momentum": 0.9}


@dataclass
class Server:
    """The running stack and a Python client of it with an admin token."""

    api: Api
    worker: Process
    client: Client
    var: Path

    @property
    def url(self) -> str:
        """The API's base URL."""
        return self.api.base

    @property
    def token(self) -> str:
        """The admin token every request of the tests carries."""
        return str(self.api.http.headers["Authorization"]).removeprefix("Bearer ")

    def cli(self, *args: str, token: str | None = None, timeout: float = 120) -> Result:
        """Run ``mnistq ARGS`` in a subprocess against this server."""
        return run_cli(*args, url=self.url, token=self.token if token is None else token,
                       timeout=timeout)  # fmt: skip


@dataclass(frozen=True)
class Result:
    """A finished ``mnistq`` process."""

    code: int
    out: str
    err: str


def cli_env(url: str, token: str) -> dict[str, str]:
    """The environment of a client process: the server's URL and token, nothing else of mnistq."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNISTQ_")}
    return env | {"MNISTQ_URL": url, "MNISTQ_TOKEN": token}


def run_cli(*args: str, url: str, token: str, timeout: float = 120) -> Result:
    """Run ``mnistq ARGS`` with MNISTQ_URL/MNISTQ_TOKEN set and capture its output."""
    done = subprocess.run(
        [*CLI, *args], env=cli_env(url, token), cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="package")
def server(
    make_pg_database: Callable[[], str],
    redis_server: RedisServer,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """gunicorn and one cpu worker on a fresh database; logs are in the tmp folder."""
    var = tmp_path_factory.mktemp("client-stack")
    broker = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    env = stack_env(
        database_url=make_pg_database(), broker_url=broker, var_dir=var, data_dir=mnist_dir
    )
    api = Api(env, var / "api.log").start()
    args = ["worker", "--queues", "cpu", "--concurrency", "1", "--loglevel", "WARNING"]
    worker = Process(args, env, var / "worker.log").start()
    token = str(api.http.headers["Authorization"]).removeprefix("Bearer ")
    yield Server(api, worker, Client(api.base, token), var)
    for process in (worker, api.process):
        process.kill()


@dataclass(frozen=True)
class Trained:
    """The job `mnistq submit --watch` trained, and how that command ended."""

    job: Job
    result: Result


@pytest.fixture(scope="package")
def trained(server: Server) -> Trained:
    """One epoch of 100 batches submitted and watched through the CLI, shared by the tests."""
    flags: list[str] = ["--n-epochs", "1", "--log-interval", "5", "--name", "cli-trained"]
    for key, value in ACCURATE.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    result = server.cli("submit", *flags, "--watch")
    job_id = result.out.splitlines()[0] if result.out else ""
    assert job_id, f"no job id printed: {result}\n{server.worker.tail()}"
    return Trained(server.client.get(job_id), result)


def job_json(job: Job) -> dict[str, Any]:
    """A job as the server's JSON."""
    return job.model_dump(mode="json", by_alias=True)
