"""The API under gunicorn's gevent workers: slow clients and open event streams block nothing.

Figures (latency of health while 20 clients trickle headers or 50 event streams are open,
against the sync workers mnistq used before) come from bench/slow_clients.py; these tests
pin the behaviour: every health probe answers, slow clients are cut off at their timeout,
and psycopg 3, SQLAlchemy's pool and redis-py yield to other greenlets under gevent.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import RedisServer
from tests.integration.stack import ROOT, Api, stack_env

pytestmark = pytest.mark.integration

PROBE = """
from gevent import monkey; monkey.patch_all()
import json, sys, gevent, psycopg.waiting, redis
from sqlalchemy import text
from shared.db import make_engine
engine = make_engine(sys.argv[1], pool_size=2, max_overflow=0, pool_timeout=30)
broker = redis.Redis.from_url(sys.argv[2])
log = []
def query(i):
    log.append(f"pg start {i}")
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_sleep(0.3)"))
    log.append(f"pg end {i}")
def pop(i):
    log.append(f"redis start {i}")
    broker.blpop([f"mnistq-probe-{i}"], timeout=1)
    log.append(f"redis end {i}")
gevent.joinall([gevent.spawn(f, i) for f in (query, pop) for i in range(6)])
print(json.dumps({"wait": psycopg.waiting.wait.__name__, "log": log}))
"""


def test_psycopg_the_pool_and_redis_yield_to_other_greenlets_under_gevent(
    pg_url: str, redis_server: RedisServer
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, pg_url, redis_server.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    probe = json.loads(done.stdout)
    assert probe["wait"] != "wait_c"  # psycopg saw the patched select and waits through it
    log: list[str] = probe["log"]
    # Cooperative: every greenlet started (6 queries on a pool of 2, 6 blocking pops) before
    # any query or pop came back; a blocking driver would finish one before the next began.
    first_end = min(i for i, entry in enumerate(log) if " end " in entry)
    assert sum(" start " in entry for entry in log[:first_end]) == 12, log
    assert sorted(entry for entry in log if " end " in entry) == sorted(
        [f"pg end {i}" for i in range(6)] + [f"redis end {i}" for i in range(6)]
    )


@pytest.fixture(scope="module")
def api(
    pg_url: str,
    redis_server: RedisServer,
    mnist_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    """``mnistq api`` (one gevent worker) with timeouts short enough to watch them act."""
    var = tmp_path_factory.mktemp("serving")
    env = stack_env(database_url=pg_url, broker_url=redis_server.url, var_dir=var,
                    data_dir=mnist_dir)  # fmt: skip
    env.update(MNISTQ_HEADER_TIMEOUT_SECONDS="1", MNISTQ_BODY_TIMEOUT_SECONDS="1",
               MNISTQ_EVENTS_STREAM_SECONDS="60")  # fmt: skip
    server = Api(env, var / "api.log").start()
    # The port opens before the worker has loaded the app: wait for its first answer.
    requests.get(f"{server.base}/api/v1/health", timeout=30).raise_for_status()
    yield server
    server.process.kill()


def health_latencies(api: Api, probes: int = 10) -> list[float]:
    """Seconds each of ``probes`` health checks took; each must answer 200 within 5 s."""
    took = []
    for _ in range(probes):
        start = time.perf_counter()
        response = requests.get(f"{api.base}/api/v1/health", timeout=5)
        took.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return took


class Trickler(threading.Thread):
    """A client that sends a request's headers one byte at a time and never finishes."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.closed_after: float | None = None

    def run(self) -> None:
        start = time.monotonic()
        head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        try:
            for byte in head:
                self.sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # reset by the server: cut off
        self.closed_after = time.monotonic() - start


def test_twenty_clients_trickling_headers_neither_block_health_nor_stay(api: Api) -> None:
    slow = [Trickler(api.port) for _ in range(20)]
    for client in slow:
        client.start()
    took = health_latencies(api)
    print(f"health with 20 trickling clients: max {max(took) * 1000:.1f} ms")
    for client in slow:
        client.join(timeout=10)
    # The header timeout (1 s here) closed every one of them, long before they finished.
    assert all(c.closed_after is not None and c.closed_after < 5 for c in slow)


def test_a_body_that_stops_coming_is_answered_408(api: Api) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        token = api.http.headers["Authorization"]
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {token}\r\n".encode()
            + b'Content-Length: 100\r\n\r\n{"name":'
        )
        start = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"error":"request_timeout"' in answer
    assert time.monotonic() - start < 5


def test_fifty_open_event_streams_leave_health_answering(api: Api) -> None:
    job = api.submit({"hyperparameters": {"n_epochs": 1}})  # no worker here: it stays queued
    url = f"{api.base}/api/v1/jobs/{job['id']}/events"
    headers = {**api.http.headers, "Accept": "text/event-stream"}
    streams = [requests.get(url, headers=headers, stream=True, timeout=10) for _ in range(50)]
    try:
        assert all(s.status_code == 200 for s in streams)
        assert all(next(s.iter_lines()) == b"retry: 2000" for s in streams)
        took = health_latencies(api)
        print(f"health with 50 open streams: max {max(took) * 1000:.1f} ms")
    finally:
        for stream in streams:
            stream.close()
