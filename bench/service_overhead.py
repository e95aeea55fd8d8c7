"""What the job service costs on top of training, measured against real Redis and PostgreSQL.

Prints, from one run:
  1. submit→running latency with an idle worker (p50, p95), Redis broker;
  2. the wall time of a 1-epoch job through the system against `mnistq train` for the same
     job, and their ratio;
  3. GET /api/v1/jobs/<id> throughput and latency against `mnistq api` with N jobs in
     PostgreSQL (wrk when installed: apt-get install wrk).

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (scripts/services) and
MNIST in MNISTQ_DATA_DIR.

    python bench/service_overhead.py [--samples 20] [--jobs 10000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, insert, text

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 13
# One keep-alive session for every call; it carries the bearer token once one is made.
HTTP = requests.Session()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database for this run, dropped at the end."""
    name = f"mnistq_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def wait_healthy(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if HTTP.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"API at {base} did not become healthy")


def poll_until(
    base: str, job_id: str, statuses: set[str], interval: float, timeout: float = 900
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = HTTP.get(f"{base}/api/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(interval)
    raise TimeoutError(f"job {job_id} never reached {statuses}")


def submit(base: str, hyperparameters: dict[str, Any]) -> str:
    reply = HTTP.post(f"{base}/api/v1/jobs", json={"hyperparameters": hyperparameters}, timeout=10)
    reply.raise_for_status()
    return str(reply.json()["id"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_latency(base: str, samples: int) -> list[float]:
    """Submit, see it running, cancel it, wait for the worker to be idle again."""
    latencies = []
    for _ in range(samples):
        t0 = time.perf_counter()
        job_id = submit(base, {"n_epochs": 1})
        poll_until(base, job_id, {"running", "succeeded", "failed"}, interval=0.005)
        latencies.append(time.perf_counter() - t0)
        HTTP.post(f"{base}/api/v1/jobs/{job_id}/cancel", timeout=10)
        poll_until(base, job_id, {"cancelled", "succeeded", "failed"}, interval=0.05)
        time.sleep(1.0)  # let the next worker child come up: "idle worker"
    return latencies


def measure_job_wall(base: str, env: dict[str, str], hp: dict[str, Any]) -> tuple[float, float]:
    """(seconds through the system, seconds for `mnistq train`) for the same 1-epoch job."""
    t0 = time.perf_counter()
    job = poll_until(base, submit(base, hp), {"succeeded", "failed", "cancelled"}, 0.05)
    system = time.perf_counter() - t0
    assert job["status"] == "succeeded", job
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in hp.items()]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(
            [str(BIN / "mnistq"), "train", *flags, "--out", out],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        local = time.perf_counter() - t0
    return system, local


def seed_jobs(database_url: str, count: int) -> list[str]:
    """Insert ``count`` finished jobs in one statement batch; return their ids."""
    from shared.models import Job, Metric

    engine = create_engine(database_url)
    ids = [uuid.uuid4().hex for _ in range(count)]
    hp = {"n_epochs": 1}
    with engine.begin() as conn:
        conn.execute(
            insert(Job),
            [
                {
                    "id": i,
                    "status": "succeeded",
                    "hyperparameters": hp,
                    "n_epochs": 1,
                    "epoch": 1,
                    "test_loss": 0.1,
                    "test_accuracy": 0.97,
                }
                for i in ids
            ],
        )
        conn.execute(
            insert(Metric),
            [
                {
                    "job_id": i,
                    "kind": "test",
                    "epoch": 1,
                    "step": 938,
                    "samples_seen": 60000,
                    "loss": 0.1,
                    "accuracy": 0.97,
                    "seconds": 5.0,
                }
                for i in ids
            ],
        )
    engine.dispose()
    return ids


def measure_throughput(base: str, ids: list[str], seconds: int) -> dict[str, float]:
    """wrk over GET /api/v1/jobs/<random id>: requests/s and p50/p99 latency in ms."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("ids = {" + ",".join(f'"{i}"' for i in ids[:2000]) + "}\n")
        script.write(
            'request = function() return wrk.format("GET", "/api/v1/jobs/" .. '
            "ids[math.random(#ids)]) end\n"
        )
    out = subprocess.run(
        [
            wrk,
            "-t2",
            "-c16",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script.name,
            "-H",
            f"Authorization: {HTTP.headers['Authorization']}",
            base,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": wrk_ms(out, "50%"),
        "p99_ms": wrk_ms(out, "99%"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
    }


def wrk_ms(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--api-workers", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mnistq-bench-"))
    with fresh_database() as database_url:
        env = bench_env(database_url, work)
        subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        HTTP.headers["Authorization"] = f"Bearer {admin_token(env)}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        mnistq = str(BIN / "mnistq")
        api = start([mnistq, "api", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", str(args.api_workers)], env, work / "api.log")  # fmt: skip
        worker = start([mnistq, "worker", "--queues", "cpu", "--concurrency", "1"],
                       env, work / "worker.log")  # fmt: skip
        try:
            wait_healthy(base)
            report(base, env, database_url, args)
        finally:
            stop(worker)
            stop(api)
    shutil.rmtree(work, ignore_errors=True)


def bench_env(database_url: str, work: Path) -> dict[str, str]:
    """The environment of every process of the run: its own database, Redis db and folders."""
    return {
        **os.environ,
        "MNISTQ_DATABASE_URL": database_url,
        "MNISTQ_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "MNISTQ_VAR_DIR": str(work / "var"),
        "MNISTQ_ARTIFACT_DIR": str(work / "art"),
        # The bench submits faster than a person would; the limit is not what it measures.
        "MNISTQ_SUBMIT_RATE_LIMIT": "100000/minute",
    }


def admin_token(env: dict[str, str]) -> str:
    """Migrate the database and create an admin; `mnistq users create` prints the token last."""
    out = subprocess.run([str(BIN / "mnistq"), "users", "create", "bench", "--admin"], env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


def report(base: str, env: dict[str, str], database_url: str, args: argparse.Namespace) -> None:
    time.sleep(3)  # the worker's first child: up and idle
    lat = measure_latency(base, args.samples)
    print(
        f"submit→running, idle worker, Redis ({len(lat)} jobs): "
        f"p50 {1000 * statistics.median(lat):.0f} ms, p95 {1000 * percentile(lat, 0.95):.0f} ms"
    )

    system, local = measure_job_wall(base, env, {"n_epochs": 1})
    print(
        f"1-epoch job wall time: through the system {system:.2f} s, "
        f"`mnistq train` {local:.2f} s, ratio {system / local:.3f}"
    )

    ids = seed_jobs(database_url, args.jobs)
    tput = measure_throughput(base, ids, args.seconds)
    print(
        f"GET /api/v1/jobs/<id> with {args.jobs} jobs in PostgreSQL, "
        f"{args.api_workers} gunicorn workers: {tput['rps']:.0f} requests/s, "
        f"p50 {tput['p50_ms']:.1f} ms, p99 {tput['p99_ms']:.1f} ms, "
        f"non-2xx {int(tput['errors'])}"
    )
    print(
        json.dumps(
            {
                "latency_p50_s": statistics.median(lat),
                "latency_p95_s": percentile(lat, 0.95),
                "wall_ratio": system / local,
                **tput,
            }
        )
    )


if __name__ == "__main__":
    main()
