"""``GET /metrics``: Prometheus text: HTTP request metrics and job figures from the database.

The HTTP metrics are counted in each serving process (under gunicorn: files in
``PROMETHEUS_MULTIPROC_DIR``, summed at each scrape); everything about jobs, queues,
workers and webhooks is read from the database at scrape time, so any API process answers
the same and no counter is lost when one restarts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from flask import Blueprint, Flask, Response, current_app, g, request
from flask.typing import ResponseReturnValue
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.auth import public_when, require_admin
from api.db import session_factory
from api.extensions import services
from api.openapi import operation
from shared import workers
from shared.lease import as_utc
from shared.models import EventKind, Job, JobEvent, JobStatus, WebhookAttempt, WorkerState

bp = Blueprint("metrics", __name__)

KEY = "mnistq.metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 8 * 3600)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HttpMetrics:
    """Request count and latency per endpoint, method and status of one app."""

    def __init__(self) -> None:
        # Registered in a registry of the app's own, not the global one: each app (tests
        # make many) has its own series. Under gunicorn the values live in the shared files.
        self.registry = CollectorRegistry()
        labels = ("method", "endpoint", "status")
        self.requests = Counter("mnistq_http_requests", "HTTP requests answered", labels,
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("mnistq_http_request_duration_seconds",
                                 "time to answer (to the first byte of a stream)", labels,
                                 buckets=HTTP_BUCKETS, registry=self.registry)  # fmt: skip

    def observe(self, response: Response) -> Response:
        """after_request: count the request under its route's endpoint name."""
        started = g.pop("metrics_started", None)
        labels = (request.method, request.endpoint or "unmatched", str(response.status_code))
        self.requests.labels(*labels).inc()
        if started is not None:
            self.latency.labels(*labels).observe(time.perf_counter() - started)
        return response


def init_app(app: Flask) -> None:
    """Count every request of ``app``."""
    metrics = HttpMetrics()
    app.extensions[KEY] = metrics
    app.before_request(_start_clock)
    app.after_request(metrics.observe)


def _start_clock() -> None:
    g.metrics_started = time.perf_counter()


@bp.get("/metrics")
@operation(summary="Prometheus metrics", responses={200: ("text/plain",)}, errors=(403,))
@public_when("metrics_public")  # MNISTQ_METRICS_PUBLIC=true; otherwise admins only
def scrape() -> ResponseReturnValue:
    """Job, queue, worker and webhook figures from the database; HTTP request metrics."""
    if not services().settings.metrics_public:
        require_admin()
    factory = session_factory()
    database = CollectorRegistry()
    database.register(DatabaseCollector(factory))
    body = generate_latest(_http_registry()) + generate_latest(database)
    return Response(body, content_type=CONTENT_TYPE)


def _http_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    metrics: HttpMetrics = current_app.extensions[KEY]
    return metrics.registry


class DatabaseCollector(Collector):
    """The figures of jobs, queues, workers and webhook deliveries, read at each scrape."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[Metric]:
        """Every database-derived metric family."""
        with self.factory() as session:
            yield _jobs(session)
            yield _oldest_wait(session)
            yield from _durations(session)
            yield _finished(session)
            yield _lease_expired(session)
            yield _workers(session)
            yield _deliveries(session)


def _jobs(session: Session) -> Metric:
    family = GaugeMetricFamily(
        "mnistq_jobs", "jobs by status and queue", labels=("status", "queue")
    )
    rows = session.execute(
        select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
    )
    for status, queue, count in rows:
        family.add_metric((status, queue), count)
    return family


def _oldest_wait(session: Session) -> Metric:
    family = GaugeMetricFamily("mnistq_queue_oldest_wait_seconds",
                               "how long the oldest queued job of each queue waits",
                               labels=("queue",))  # fmt: skip
    for view in workers.queue_summary(session):
        family.add_metric((view.name,), view.oldest_wait_seconds or 0.0)
    return family


def _durations(session: Session) -> Iterator[Metric]:
    rows = session.execute(
        select(Job.created_at, Job.started_at, Job.finished_at, Job.status).where(
            Job.started_at.is_not(None)
        )
    ).all()
    waits = [_seconds(created, started) for created, started, _, _ in rows if started]
    runs = [
        _seconds(started, finished)
        for _, started, finished, status in rows
        if started and finished and JobStatus(status).finished
    ]
    yield _histogram("mnistq_job_wait_seconds", "submission to first start", waits, WAIT_BUCKETS)
    yield _histogram("mnistq_job_run_seconds", "first start to the end", runs, RUN_BUCKETS)


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (as_utc(end) - as_utc(start)).total_seconds())


def _histogram(
    name: str, text: str, values: Sequence[float], bounds: Iterable[float]
) -> HistogramMetricFamily:
    buckets = [(str(float(b)), sum(1 for v in values if v <= b)) for b in bounds]
    buckets.append(("+Inf", len(values)))
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=sum(values))


def _finished(session: Session) -> Metric:
    family = CounterMetricFamily("mnistq_jobs_finished", "jobs that ended, by end state",
                                 labels=("status",))  # fmt: skip
    ended = [status for status in JobStatus if status.finished]
    counts = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.status.in_(ended)).group_by(Job.status)
        ).all()
    )
    for status in ended:
        family.add_metric((status.value,), counts.get(status.value, 0))
    return family


def _lease_expired(session: Session) -> Metric:
    count = session.scalar(
        select(func.count()).where(
            JobEvent.kind == EventKind.STATUS, JobEvent.reason == "lease_expired"
        )
    )
    return CounterMetricFamily("mnistq_lease_expired", "leases that expired (worker died, froze)",
                               value=count or 0)  # fmt: skip


def _workers(session: Session) -> Metric:
    family = GaugeMetricFamily("mnistq_workers", "workers seen in the last hour, by state",
                               labels=("state",))  # fmt: skip
    views = workers.list_workers(session)
    for state in WorkerState:
        family.add_metric((state.value,), sum(1 for view in views if view.state == state))
    return family


def _deliveries(session: Session) -> Metric:
    family = CounterMetricFamily("mnistq_webhook_deliveries", "webhook delivery tries, by outcome",
                                 labels=("outcome",))  # fmt: skip
    rows = session.execute(
        select(WebhookAttempt.outcome, func.count()).group_by(WebhookAttempt.outcome)
    )
    for outcome, count in rows:
        family.add_metric((outcome,), count)
    return family
