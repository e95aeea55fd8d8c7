"""docker-compose.yml is valid and every service runs a real entry point with real settings."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from client.cli import cli
from shared.config import Settings

ROOT = Path(__file__).resolve().parent.parent
MNISTQ_SERVICES = ("migrate", "api", "worker", "worker-gpu")


SECRET_KEY = "k" * 48  # what an operator exports; compose has no default of its own
STORE_SECRET = "s" * 40
OPERATOR_ENV = {"MNISTQ_SECRET_KEY": SECRET_KEY, "AWS_SECRET_ACCESS_KEY": STORE_SECRET}


def run_compose_config(*extra: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose [extra] config`` in the repository with exactly ``env`` (plus PATH)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (scripts/services installs it)")
    return subprocess.run(
        [exe, *extra, "config"], cwd=ROOT, capture_output=True, text=True, check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")} | env,
    )  # fmt: skip


def compose_config(*extra: str) -> dict[str, Any]:
    """The file as docker-compose itself resolves it (anchors, merges, profiles)."""
    out = run_compose_config(*extra, env=OPERATOR_ENV)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The resolved services, the gpu profile included."""
    result: dict[str, Any] = compose_config("--profile", "gpu")["services"]
    return result


def resolve_click_command(args: list[str]) -> tuple[click.Command, str, list[str]]:
    """Walk the mnistq group down to the subcommand ``args`` name."""
    command: click.Command = cli
    name = "mnistq"
    while isinstance(command, click.Group):
        name = args.pop(0)
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"mnistq has no subcommand {name!r}"
        command = sub
    return command, name, args


def test_compose_file_is_valid_without_and_with_the_gpu_profile() -> None:
    default = compose_config()["services"]
    assert {"redis", "postgres", "migrate", "api", "worker"} <= set(default)
    # Only the gpu profile starts the GPU worker; everything else runs by default.
    assert default["worker-gpu"]["profiles"] == ["gpu"]
    assert all("profiles" not in spec for name, spec in default.items() if name != "worker-gpu")
    assert "worker-gpu" in compose_config("--profile", "gpu")["services"]


@pytest.mark.parametrize("service", MNISTQ_SERVICES)
def test_service_command_is_a_real_entry_point(services: dict[str, Any], service: str) -> None:
    command = list(services[service]["command"])
    program = command.pop(0)
    if program == "mnistq":
        sub, name, args = resolve_click_command(command)
        sub.make_context(name, args)  # raises on an unknown option or a bad value
    else:
        assert program == "celery", f"{service} runs {program}, not a mnistq entry point"
        assert command[0] == "-A"
        module = __import__(command[1], fromlist=["app"])
        from celery import Celery

        assert isinstance(module.app, Celery)
        assert command[2] == "worker"


@pytest.mark.parametrize("service", MNISTQ_SERVICES)
def test_every_mnistq_variable_is_a_real_setting(services: dict[str, Any], service: str) -> None:
    env = services[service].get("environment", {})
    names = {k for k in env if k.startswith("MNISTQ_")}
    assert names, f"{service} sets no MNISTQ_ variable"
    fields = {f"MNISTQ_{name.upper()}" for name in Settings.model_fields}
    assert names <= fields, f"unknown settings in {service}: {sorted(names - fields)}"
    Settings.model_validate({k.removeprefix("MNISTQ_").lower(): v for k, v in env.items()})


def test_stack_shape_matches_the_design(services: dict[str, Any]) -> None:
    assert "--appendonly" in services["redis"]["command"]
    assert services["postgres"]["healthcheck"]["test"]
    migrate_deps = services["migrate"]["depends_on"]
    assert migrate_deps["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        cond = services[name]["depends_on"]["migrate"]["condition"]
        assert cond == "service_completed_successfully"

    def mounts(name: str) -> set[str]:
        # docker-compose 1.x prints volumes in the short form "source:target:mode".
        return {str(v).split(":")[0] for v in services[name].get("volumes", [])}

    # No folder in common: artifacts go to the object store, which api and workers wait for.
    assert not mounts("api") and "data" in mounts("worker")
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["MNISTQ_ARTIFACT_URL"].startswith("s3://"), name
        assert env["MNISTQ_S3_ENDPOINT_URL"] == "http://seaweedfs:8333", name
        assert services[name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "artifacts" not in mounts("worker") | mounts("worker-gpu")
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")
    assert services["worker"]["command"][services["worker"]["command"].index("--queues") + 1]
    gpu = services["worker-gpu"]
    assert "gpu" in gpu["command"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"


def test_compose_refuses_to_start_without_a_secret_key() -> None:
    """No known default key: without MNISTQ_SECRET_KEY there is no stack at all."""
    out = run_compose_config(env={"AWS_SECRET_ACCESS_KEY": STORE_SECRET})
    assert out.returncode != 0
    assert "MNISTQ_SECRET_KEY" in out.stderr


def test_compose_refuses_to_start_without_an_object_store_secret() -> None:
    """The store's one identity has no default secret either; the store and its clients agree."""
    out = run_compose_config(env={"MNISTQ_SECRET_KEY": SECRET_KEY})
    assert out.returncode != 0
    assert "AWS_SECRET_ACCESS_KEY" in out.stderr


def test_the_object_store_and_its_clients_share_the_operators_key(
    services: dict[str, Any],
) -> None:
    store = services["seaweedfs"]["environment"]
    assert store["AWS_SECRET_ACCESS_KEY"] == STORE_SECRET
    for name in ("api", "worker", "worker-gpu"):
        env = services[name]["environment"]
        assert env["AWS_SECRET_ACCESS_KEY"] == STORE_SECRET, name
        assert env["AWS_ACCESS_KEY_ID"] == store["AWS_ACCESS_KEY_ID"], name


def test_compose_passes_the_operators_key_and_a_secure_cookie(services: dict[str, Any]) -> None:
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert env["MNISTQ_SECRET_KEY"] == SECRET_KEY
        secure = env["MNISTQ_SESSION_COOKIE_SECURE"]
        assert Settings.model_validate({"session_cookie_secure": secure}).session_cookie_secure
