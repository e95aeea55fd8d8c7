"""The worker's side of the registry: a thread in the main process that says it is alive.

Started when the Celery worker is ready, stopped (and the row deleted) when it shuts down.
It runs in the prefork parent, so it imports nothing of torch.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import workers
from shared.config import Settings
from shared.db import make_session_factory
from shared.models import WorkerState
from shared.workers import WorkerInfo
from worker.runner import make_worker_engine

logger = logging.getLogger(__name__)


class RegistryBeat:
    """Upserts this worker's registry row every heartbeat interval until stopped."""

    def __init__(self, settings: Settings, on_drain: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_drain = on_drain  # called once, from the beat thread, when asked to drain
        self.draining = False
        self.worker_id = workers.new_worker_id()
        self.info: WorkerInfo | None = None
        self._engine: Engine | None = None
        self._factory: sessionmaker[Session] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str, queues: Iterable[str], concurrency: int) -> None:
        """Register this process and keep its row fresh from a daemon thread."""
        self.info = WorkerInfo(
            id=self.worker_id, name=name, hostname=socket.gethostname(),
            pid=os.getpid(), queues=tuple(sorted(queues)), concurrency=concurrency,
            heartbeat_seconds=self.settings.heartbeat_seconds,
        )  # fmt: skip
        self._engine = make_worker_engine(self.settings)
        self._factory = make_session_factory(self._engine)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="worker-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and delete the row: the worker serves no queue any more."""
        # Taken first: a second shutdown signal may run this again inside the first call.
        thread, self._thread = self._thread, None
        if thread is None or self.info is None or self._factory is None:
            return
        self._stop.set()
        thread.join(timeout=5)
        try:
            workers.remove(self._factory, self.info.id)
        except DBAPIError:
            logger.warning("worker registry: could not remove this worker's row", exc_info=True)

    @property
    def session_factory(self) -> sessionmaker[Session] | None:
        """Sessions of the beat's own engine, once started."""
        return self._factory

    def after_fork(self) -> None:
        """In a pool child: drop the parent's connections without closing them under it."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._engine, self._factory, self._thread = None, None, None

    def _run(self) -> None:
        assert self.info is not None and self._factory is not None
        while True:
            try:
                state = workers.beat(self._factory, self.info)
            except DBAPIError:
                # Not live for the API until the database answers again; nothing else to do.
                logger.warning("worker registry: beat failed", exc_info=True)
            else:
                if state == WorkerState.DRAINING and not self.draining:
                    self.draining = True
                    logger.warning("worker %s: asked to drain", self.info.id)
                    if self.on_drain is not None:
                        self.on_drain()
            if self._stop.wait(self.settings.heartbeat_seconds):
                return
