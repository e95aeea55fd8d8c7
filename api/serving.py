"""How gunicorn serves the API: gevent workers with header and body read timeouts.

``mnistq api`` runs ``gunicorn -c python:api.serving 'api:create_app()'``: this module is
gunicorn's config (the names below that gunicorn knows) and holds the worker class. Each
connection is a greenlet, so slow clients and open event streams cost memory, not workers
(docs/architecture.md §10). Imported by gunicorn's master before any monkey-patching: it
must not import sockets, psycopg, redis or the app at module level.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path
from typing import Any

import gevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker

PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# gunicorn settings (names gunicorn reads from this module).
worker_class = "api.serving.TimeoutGeventWorker"
worker_connections = 1000  # open connections per worker process: streams and slow clients
graceful_timeout = 10  # open event streams are cut after this on restart; clients reconnect


class TimeoutGeventWorker(GeventWorker):
    """gunicorn's gevent worker with a deadline on a request's headers and on each I/O wait."""

    header_timeout = 5.0
    io_timeout = 30.0

    def init_process(self) -> None:
        """Read the timeouts from the settings, then patch and load the app as gevent does."""
        from shared.config import get_settings  # pydantic only: safe before patching

        settings = get_settings()
        self.header_timeout = settings.header_timeout_seconds
        self.io_timeout = settings.body_timeout_seconds
        super().init_process()

    def timeout_ctx(self) -> gevent.Timeout:
        """The request line and headers must all arrive within ``header_timeout``."""
        # gunicorn wraps the read of every request's head in this (the first one included);
        # its own uses keep-alive, which then also closes idle kept-alive connections.
        return gevent.Timeout(self.header_timeout, False)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        """Serve one connection whose every read (body included) and write has a timeout."""
        # GeventWorker.handle sets the socket blocking without a timeout: a client that
        # stops sending its body, or stops reading an event stream, would hold it forever.
        client.settimeout(self.io_timeout)
        AsyncWorker.handle(self, listener, client, addr)


def prepare_metrics_dir(path: Path) -> None:
    """An empty folder for prometheus_client's per-process files, named in the environment."""
    # Files of processes of an earlier run would add their counts to this one's.
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[PROMETHEUS_DIR_ENV] = str(path)


def child_exit(_server: Any, worker: Any) -> None:
    """gunicorn hook: a worker that exited stops counting in the live gauges."""
    if os.environ.get(PROMETHEUS_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(_worker: Any) -> None:
    """gunicorn hook, once the app is loaded in a worker: keep its objects out of the GC."""
    # Flask, SQLAlchemy, pydantic and their modules are hundreds of thousands of objects that
    # live as long as the process; frozen, the collector stops walking them at each full
    # collection, which otherwise stalls every request the worker holds. A request makes
    # thousands of short-lived objects, so young collections also come less often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
