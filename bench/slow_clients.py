"""Health-check latency while slow clients or open event streams hold connections.

Runs the API twice against real PostgreSQL and Redis, as mnistq used to serve it (gunicorn,
2 sync workers) and as `mnistq api` serves it now (gevent workers, api/serving.py), and
prints for each, from one run: GET /api/v1/health latency (p50, p95, max, failures) with
  1. nothing else going on;
  2. 20 clients trickling request headers one byte every 0.1 s;
  3. 50 event streams (GET /api/v1/jobs/<id>/events) opened at once on a quiet job whose
     log already holds BACKLOG lines (about what a 3-epoch seed job writes), so that each
     stream first replays them from the database, then waits;
  4. the same while the job gets 20 log lines a second, each sent to all 50 streams.

Needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (scripts/services).

    python bench/slow_clients.py [--probes 100]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from service_overhead import free_port, fresh_database

ROOT = Path(__file__).resolve().parent.parent
BACKLOG = 1000  # log lines of the job before the streams open
SETUPS = {
    "sync x2 (before)": ["--workers", "2"],
    "gevent x2 (now)": ["--config", "python:api.serving", "--workers", "2"],
}


@contextmanager
def migrated_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database for this run, dropped at the end."""
    from shared.migrate import upgrade

    with fresh_database() as url:
        upgrade(url)
        yield url


@contextmanager
def api(args: list[str], env: dict[str, str]) -> Iterator[str]:
    """gunicorn with ``args`` on a free port until the block ends; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", *args, "--bind", f"127.0.0.1:{port}",
            "api:create_app()"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{base}/api/v1/health", timeout=5)
                break
            except requests.RequestException:
                time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def probe(base: str, n: int) -> tuple[list[float], int]:
    """Latencies (ms) of ``n`` health checks one after another, and how many failed (>2 s);
    five failures in a row end the run (the server is not answering)."""
    took, failed, in_a_row = [], 0, 0
    for _ in range(n):
        start = time.perf_counter()
        try:
            requests.get(f"{base}/api/v1/health", timeout=2).raise_for_status()
            took.append((time.perf_counter() - start) * 1000)
            in_a_row = 0
        except requests.RequestException:
            failed += 1
            in_a_row += 1
            if in_a_row == 5:
                break
        time.sleep(0.05)
    return took, failed


def trickle(base: str, stop: threading.Event, ready: Callable[[], None]) -> None:
    """Send a request's headers a byte every 0.1 s, reconnecting when cut off."""
    port = int(base.rsplit(":", 1)[1])
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                ready()
                for byte in b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(0.1)
        except OSError:
            time.sleep(0.1)


def stream(url: str, token: str, stop: threading.Event, ready: Callable[[], None]) -> None:
    """Hold an event stream open, reading what comes, until ``stop``."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    while not stop.is_set():
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(2, 30)) as response:
                ready()
                for _ in response.iter_lines():
                    if stop.is_set():
                        return
        except requests.RequestException:
            time.sleep(0.1)


Load = Callable[[threading.Event, Callable[[], None]], None]


def _run_load(load: Load, count: int, stop: Any, ready: Any) -> None:
    """In a process of its own: ``count`` threads running ``load`` until ``stop`` is set."""
    halt = threading.Event()

    def one_ready() -> None:
        with ready.get_lock():
            ready.value += 1

    threads = [
        threading.Thread(target=load, args=(halt, one_ready), daemon=True) for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    stop.wait()
    halt.set()


def under_load(base: str, n: int, load: Load, count: int) -> str:
    """Health latencies once ``count`` clients run ``load`` (in another process, so that
    their threads do not slow the probe's own measurement)."""
    stop, ready = multiprocessing.Event(), multiprocessing.Value("i", 0)
    worker = multiprocessing.Process(target=_run_load, args=(load, count, stop, ready))
    worker.daemon = True
    worker.start()
    deadline = time.monotonic() + 20
    while ready.value < count and time.monotonic() < deadline:
        time.sleep(0.1)  # every slow client connected, every stream open
    time.sleep(0.5)
    result = summary(*probe(base, n))
    stop.set()
    worker.join(timeout=10)
    return result


@contextmanager
def busy_job(database_url: str, job_id: str) -> Iterator[None]:
    """Append a log line to the job every 0.05 s, as a running worker writes, until the end."""
    from shared import events
    from shared.db import make_engine, make_session_factory

    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.wait(0.05):
            n += 1
            with factory() as session, session.begin():
                events.append(session, job_id, [events.line(f"Train Epoch: 1 [{n}/60000]")])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()
        engine.dispose()


def summary(took: list[float], failed: int) -> str:
    if not took:
        return f"all {failed} probes failed"
    q = statistics.quantiles(took, n=20) if len(took) > 1 else took * 19
    return (f"p50 {statistics.median(took):6.1f} ms  p95 {q[18]:6.1f} ms  "
            f"max {max(took):7.1f} ms  failed {failed}/{len(took) + failed}")  # fmt: skip


def setup_job(database_url: str, name: str, backlog: int) -> tuple[str, str]:
    """An admin token and a queued job with ``backlog`` log lines (no worker runs: its stream
    stays open)."""
    from shared import events
    from shared.auth import create_user
    from shared.db import make_engine, make_session_factory
    from shared.models import Job

    engine = make_engine(database_url)
    with make_session_factory(engine)() as session:
        user, issued = create_user(session, name, admin=True)
        job = Job(hyperparameters={"n_epochs": 1}, owner_id=user.id)
        session.add(job)
        session.flush()
        lines = [events.line(f"Train Epoch: 1 [{n}/60000]") for n in range(backlog)]
        events.append(session, job.id, lines)
        session.commit()
        job_id = job.id
    engine.dispose()
    return issued.secret, job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--backlog", type=int, default=BACKLOG, help="log lines to replay")
    args = parser.parse_args()
    with migrated_database() as url, tempfile.TemporaryDirectory() as var:
        env = {**os.environ, "MNISTQ_DATABASE_URL": url, "MNISTQ_VAR_DIR": var,
               "MNISTQ_BROKER_URL": "redis://127.0.0.1:6379/14"}  # fmt: skip
        for n, (name, argv) in enumerate(SETUPS.items()):
            # A fresh job and backlog for each setup.
            token, job_id = setup_job(url, f"bench{n}", args.backlog)
            with api(argv, env) as base:
                events = f"{base}/api/v1/jobs/{job_id}/events"
                print(f"{name} (each stream first replays {args.backlog} log lines)")
                print(f"  idle                  {summary(*probe(base, args.probes))}")
                slow = under_load(base, args.probes, functools.partial(trickle, base), 20)
                print(f"  20 trickling clients  {slow}")
                streams = under_load(
                    base, args.probes, functools.partial(stream, events, token), 50
                )
                print(f"  50 event streams      {streams}")
                with busy_job(url, job_id):
                    busy = under_load(base, args.probes, functools.partial(stream, events, token),
                                      50)  # fmt: skip
                print(f"  50 streams, 20 ev/s   {busy}")


if __name__ == "__main__":
    main()
