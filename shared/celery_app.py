"""The Celery app both processes build, the task names and queues that are their contract."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from shared.config import Settings

TRAIN_TASK = "mnistq.train"
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)

BROKER_CONNECT_TIMEOUT = 2.0  # seconds
BROKER_SOCKET_TIMEOUT = 10.0
# On a cold shutdown, how long running jobs get to hand themselves back to the queue.
SOFT_SHUTDOWN_SECONDS = 15.0


class BrokerUnavailable(Exception):
    """The broker could not take a message; the job stays queued for the reaper."""


def queue_for_device(device: str) -> str:
    """The queue a job requesting ``device`` goes to: cuda jobs need a GPU worker."""
    return GPU_QUEUE if device == "cuda" else CPU_QUEUE


def _transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.2,
        }
    # Redis: a message not acked within this time is delivered again. The lease makes
    # that harmless (the second delivery finds the job claimed), so set it above the
    # longest job rather than relying on it.
    return {
        "visibility_timeout": settings.visibility_timeout_seconds,
        # Bounded waits, so a publish fails fast (→ BrokerUnavailable, the job stays queued
        # for the reaper) instead of hanging an HTTP request while Redis is away.
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        "socket_timeout": BROKER_SOCKET_TIMEOUT,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for at-least-once delivery with the job row as the truth."""
    app = Celery("mnistq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT,
        worker_soft_shutdown_timeout=SOFT_SHUTDOWN_SECONDS,
        worker_enable_soft_shutdown_on_idle=True,
        broker_transport_options=_transport_options(settings),
        # Each queue its own direct exchange and key: with Celery's defaults every queue
        # would bind to the default queue's exchange and key, and a gpu message reach cpu.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES
        ],
        task_default_queue=CPU_QUEUE,
        task_routes={TRAIN_TASK: {"queue": CPU_QUEUE}},
        worker_hijack_root_logger=False,
    )
    return app


def publish_train(app: Celery, job_id: str, queue: str) -> None:
    """Tell the workers of ``queue`` that job ``job_id`` waits; raise BrokerUnavailable."""
    try:
        app.send_task(
            TRAIN_TASK,
            args=[job_id],
            queue=queue,
            retry=False,
        )
    except (OperationalError, OSError) as exc:
        raise BrokerUnavailable(str(exc)) from exc


def celery_publisher(settings: Settings) -> Callable[[str, str], None]:
    """publish(job_id, queue) through a Celery app built for ``settings`` (send_task by name)."""
    return functools.partial(publish_train, make_celery(settings))
