"""What the job service costs on top of training, measured against real Redis and PostgreSQL.

Prints, from one run:
  1. submit→running latency with an idle, warmed-up worker (p50, p95), Redis broker;
  2. the wall time of a 1-epoch job through the system (submit → succeeded, idle warm worker)
     against `mnistq train` for the same job, in alternating pairs, and the median ratio;
  3. GET /api/v1/jobs/<id> throughput and latency against `mnistq api` with N jobs in
     PostgreSQL (wrk: apt-get install wrk), at each --connections: of finished jobs (whose
     answers each API process keeps, api/answer_cache.py) and of running jobs (read afresh
     every time); and a conditional GET answered 304.

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (scripts/services) and
MNIST in MNISTQ_DATA_DIR.

    python bench/service_overhead.py [--samples 20] [--pairs 3] [--jobs 100000] [--seconds 10]
                                     [--connections 16,4]
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
REDIS_DB = 13
WRK_IDS = 2000  # the jobs wrk asks for, at random
FILL_PASSES = 12  # requests per id before measuring: 2**-12 of them not yet kept by a process
RUNNING = 1000  # of the seeded jobs: running ones, whose answers change and are never kept
# (a tenth of them when fewer than 10,000 are seeded: most stay finished)
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


def start(
    args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        args, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
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
        except requests.RequestException:  # not up yet, or slow to answer its first request
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


def warm_processes(log: Path) -> int:
    """Job processes of the worker that have logged their warm-up so far."""
    return log.read_text(errors="replace").count("warmed up in") if log.exists() else 0


def wait_warm(log: Path, count: int, timeout: float = 300) -> None:
    """Block until ``count`` job processes have warmed up: the worker is idle and warm."""
    deadline = time.monotonic() + timeout
    while warm_processes(log) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker's job process never warmed up; see {log}")
        time.sleep(0.05)


def measure_latency(base: str, samples: int, log: Path) -> list[float]:
    """Submit, see it running, cancel it, wait for the worker's next job process to be warm."""
    latencies = []
    for _ in range(samples):
        warmed = warm_processes(log)
        t0 = time.perf_counter()
        job_id = submit(base, {"n_epochs": 1})
        poll_until(base, job_id, {"running", "succeeded", "failed"}, interval=0.005)
        latencies.append(time.perf_counter() - t0)
        HTTP.post(f"{base}/api/v1/jobs/{job_id}/cancel", timeout=10)
        poll_until(base, job_id, {"cancelled", "succeeded", "failed"}, interval=0.05)
        wait_warm(log, warmed + 1)  # the job process forked for the next job: "idle warm worker"
    return latencies


def measure_job_wall(
    base: str, env: dict[str, str], hp: dict[str, Any], log: Path
) -> tuple[float, float]:
    """(seconds through the system, seconds for `mnistq train`) for the same 1-epoch job."""
    warmed = warm_processes(log)
    t0 = time.perf_counter()
    job = poll_until(base, submit(base, hp), {"succeeded", "failed", "cancelled"}, 0.05)
    system = time.perf_counter() - t0
    wait_warm(log, warmed + 1)  # the next job's process warms up while `mnistq train` runs
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


def seed_jobs(database_url: str, count: int) -> tuple[list[str], list[str]]:
    """COPY ``count`` jobs (with a test metric and an artifact each), RUNNING of them (at most
    a tenth) running and the rest finished; their ids, (finished, running)."""
    import psycopg

    ids = [uuid.uuid4().hex for _ in range(count)]
    n_running = min(RUNNING, count // 10)
    running = set(ids[-n_running:])
    now = datetime.now(UTC)
    hp = json.dumps({"n_epochs": 1})
    job_cols = ("id, status, hyperparameters, device_requested, queue, priority, attempt, "
                "cancel_requested, epoch, n_epochs, step, steps_per_epoch, samples_seen, "
                "total_samples, test_loss, test_accuracy, created_at, finished_at")  # fmt: skip
    with psycopg.connect(database_url.replace("+psycopg", "")) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY job ({job_cols}) FROM STDIN") as copy:
            for i in ids:
                status, end = ("running", None) if i in running else ("succeeded", now)
                copy.write_row((i, status, hp, "auto", "cpu", 0, 1, False, 1, 1, 938, 938,
                                60000, 60000, 0.1, 0.97, now, end))  # fmt: skip
        metric_cols = "job_id, kind, epoch, step, samples_seen, loss, accuracy, seconds"
        with cur.copy(f"COPY metric ({metric_cols}) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i, "test", 1, 938, 60000, 0.1, 0.97, 5.0))
        artifact_cols = "job_id, name, kind, size, sha256, created_at"
        with cur.copy(f"COPY artifact ({artifact_cols}) FROM STDIN") as copy:
            for i in ids:
                copy.write_row((i, "model.pth", "model", 1000, "0" * 64, now))
        cur.execute("ANALYZE")
    return [i for i in ids if i not in running], ids[-n_running:]


def fill_answers(base: str, ids: list[str]) -> None:
    """Ask for each of the ids wrk asks for about FILL_PASSES times, so that every API
    process keeps their answers: the measured runs are then the steady state of a poller."""
    # Each request reaches one process or another at random: an id asked for k times is
    # still missing from a given process (of two) with odds 2**-k. A short first run gives
    # the rate that sizes the fill.
    first = max(1.0, measure_throughput(base, ids, 3, 8)["rps"])
    measure_throughput(base, ids, max(3, round(FILL_PASSES * WRK_IDS / first)), 8)


def measure_throughput(
    base: str, ids: list[str], seconds: int, connections: int
) -> dict[str, float]:
    """wrk over GET /api/v1/jobs/<random id>: requests/s and p50/p99 latency in ms."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("ids = {" + ",".join(f'"{i}"' for i in ids[:WRK_IDS]) + "}\n")
        script.write(
            'request = function() return wrk.format("GET", "/api/v1/jobs/" .. '
            "ids[math.random(#ids)]) end\n"
        )
    out = subprocess.run(
        [
            wrk,
            "-t2",
            f"-c{connections}",
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
    parser.add_argument("--pairs", type=int, default=3, help="system/`mnistq train` pairs")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--connections", default="16,4",
                        help="wrk's open connections, one GET run for each")  # fmt: skip
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mnistq-bench-"))
    with stack(work, api_workers=args.api_workers, slots=1) as (base, env, database_url):
        report(base, env, database_url, args, work / "worker.log")
    shutil.rmtree(work, ignore_errors=True)


@contextmanager
def stack(
    work: Path, *, api_workers: int = 2, slots: int = 1, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, str], str]]:
    """`mnistq api` and `mnistq worker` on a fresh database and an empty Redis db, logging
    into ``work``, with an admin token in HTTP; yields (base URL, environment, database URL)."""
    with fresh_database() as database_url:
        env = {**bench_env(database_url, work), **(extra_env or {})}
        subprocess.run(["redis-cli", "-n", str(REDIS_DB), "FLUSHDB"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        HTTP.headers["Authorization"] = f"Bearer {admin_token(env)}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        mnistq = str(BIN / "mnistq")
        api = start([mnistq, "api", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", str(api_workers)], env, work / "api.log")  # fmt: skip
        worker = start([mnistq, "worker", "--queues", "cpu", "--concurrency", str(slots)],
                       env, work / "worker.log")  # fmt: skip
        try:
            wait_healthy(base)
            yield base, env, database_url
        finally:
            stop(worker)
            stop(api)


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


def report(
    base: str, env: dict[str, str], database_url: str, args: argparse.Namespace, log: Path
) -> None:
    wait_warm(log, 1)  # the worker's first job process: up, warm and idle
    lat = measure_latency(base, args.samples, log)
    if lat:
        print(
            f"submit→running, idle warm worker, Redis ({len(lat)} jobs): p50 "
            f"{1000 * statistics.median(lat):.0f} ms, p95 {1000 * percentile(lat, 0.95):.0f} ms"
        )
    ratios = []
    for pair in range(1, args.pairs + 1):
        system, local = measure_job_wall(base, env, {"n_epochs": 1}, log)
        ratios.append(system / local)
        print(f"1-epoch job, pair {pair}: through the system {system:.2f} s, "
              f"`mnistq train` {local:.2f} s, ratio {system / local:.3f}", flush=True)  # fmt: skip
    if ratios:
        print(f"1-epoch job wall time ratio, median of {len(ratios)} pairs: "
              f"{statistics.median(ratios):.3f}")  # fmt: skip

    ids, running = seed_jobs(database_url, args.jobs)
    server = f"{args.jobs} jobs in PostgreSQL, {args.api_workers} gunicorn workers " + (
        api_worker_class(base)
    )
    fill_answers(base, ids)  # a poller asks for the same jobs again and again
    runs = {}
    for connections in (int(c) for c in args.connections.split(",")):
        for name, chosen in (("finished", ids), ("running", running)):
            tput = runs[f"{name}_c{connections}"] = measure_throughput(
                base, chosen, args.seconds, connections
            )
            kept = "" if name == "finished" else ", never kept"
            print(f"GET /api/v1/jobs/<id> of {name} jobs{kept}, {server}, wrk -c{connections}: "
                  f"{rate(tput)}", flush=True)  # fmt: skip
    first = HTTP.get(f"{base}/api/v1/jobs/{ids[0]}", timeout=10)
    tag = {"If-None-Match": first.headers["ETag"]}
    again = HTTP.get(f"{base}/api/v1/jobs/{ids[0]}", headers=tag, timeout=10)
    print(f"conditional GET with the ETag of the last answer: {again.status_code}, "
          f"{len(again.content)} bytes (full answer {len(first.content)} bytes)")  # fmt: skip
    print(
        json.dumps(
            {
                "latency_p50_s": statistics.median(lat) if lat else None,
                "latency_p95_s": percentile(lat, 0.95) if lat else None,
                "wall_ratio": statistics.median(ratios) if ratios else None,
                "wall_ratios": ratios,
                "conditional_status": again.status_code,
                **runs,
            }
        )
    )


def rate(tput: dict[str, float]) -> str:
    return (f"{tput['rps']:.0f} requests/s, p50 {tput['p50_ms']:.1f} ms, "
            f"p99 {tput['p99_ms']:.1f} ms, non-2xx {int(tput['errors'])}")  # fmt: skip


def api_worker_class(base: str) -> str:
    """The gunicorn worker class `mnistq api` runs (from its command line)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    port = base.rsplit(":", 1)[1]
    line = next((x for x in out.splitlines() if "gunicorn" in x and f":{port}" in x), "")
    if "python:api.serving" in line:
        from api.serving import worker_class

        return f"(worker class {worker_class}, from api.serving)"
    found = re.search(r"(?:-k|--worker-class)[ =](\S+)", line)
    return f"(worker class {found.group(1) if found else 'sync, the default'})"


if __name__ == "__main__":
    main()
