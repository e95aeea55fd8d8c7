"""Settings: the one typed object read from ``MNISTQ_*`` environment variables."""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything configurable about a mnistq process; built once and passed explicitly."""

    model_config = SettingsConfigDict(env_prefix="MNISTQ_", extra="ignore")

    # Where things live. The defaults are the embedded mode: SQLite, a filesystem broker
    # and folders under ./var, so one command runs the whole system with no services.
    var_dir: Path = Path("var")
    database_url: str = "sqlite:///var/mnistq.db"
    broker_url: str = "filesystem://"
    artifact_dir: Path = Path("var/artifacts")
    artifact_url: str = Field(
        "", description="s3://bucket/prefix, file:///path or a path; empty: artifact_dir"
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 API endpoint of a server other than AWS, e.g. http://seaweedfs:8333"
    )
    scratch_dir: Path = Field(
        Path("var/scratch"), description="worker-local folder jobs train into before upload"
    )
    data_dir: Path = Path("var/data")

    # Training processes.
    train_threads: int = Field(
        0, ge=0, description="torch threads per job; 0 = the usable cores shared among the slots"
    )
    train_niceness: int = Field(
        10, ge=0, le=19,
        description="how much lower a training process's CPU priority is than its worker's",
    )  # fmt: skip
    download_mnist: bool = Field(True, description="let torchvision download MNIST if missing")
    max_train_batches: int | None = Field(
        None, ge=1, description="cap on training batches per epoch (smoke runs, tests)"
    )

    # Reliability protocol (docs/architecture.md, "Job lifecycle").
    lease_seconds: float = Field(30.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    reaper_interval_seconds: float = Field(10.0, gt=0)
    requeue_grace_seconds: float = Field(60.0, ge=0)
    store_wait_seconds: float = Field(
        120.0, ge=0,
        description="how long a running job waits for an artifact store that does not "
        "answer before it is handed back to the queue",
    )  # fmt: skip
    visibility_timeout_seconds: int = Field(12 * 3600, gt=0)

    # HTTP API.
    max_body_bytes: int = Field(64 * 1024, gt=0)
    page_size: int = Field(50, ge=1, le=500)
    db_pool_size: int = Field(
        10, ge=1, le=500,
        description="PostgreSQL connections each API process keeps open; a burst may open "
        "as many more, each closed after its request",
    )  # fmt: skip
    token_cache_seconds: float = Field(
        1.0, ge=0, le=60,
        description="how long an API process trusts a token it checked; a revoked token "
        "stops working within this many seconds (0: check every request)",
    )  # fmt: skip

    # Slow clients (gunicorn's gevent workers, api/serving.py).
    header_timeout_seconds: float = Field(
        5.0, gt=0, description="a request's line and headers must arrive within this"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="longest wait for the next bytes of a body (or for a write)"
    )

    # Live event streams (server-sent events).
    events_poll_seconds: float = Field(
        0.5, gt=0, le=10, description="how often an open stream looks for new events"
    )
    events_keepalive_seconds: float = Field(
        15.0, gt=0, description="an idle stream sends a comment this often"
    )
    events_stream_seconds: float = Field(
        300.0, gt=0, description="a stream closes after this long; clients reconnect"
    )

    # Webhooks (shared/webhooks.py; sent by every worker's main process).
    webhook_allow_private: bool = Field(
        False, description="let endpoints resolve to loopback, private or link-local addresses"
    )
    webhook_retry_seconds: tuple[float, ...] = Field(
        (5, 300, 1800, 7200, 18000, 36000),
        description="waits after each failed try (7 tries over about 17.5 h by default)",
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=30, description="per post, in all")

    # Prometheus.
    metrics_public: bool = Field(
        False, description="GET /metrics without a token; otherwise an admin's token is needed"
    )

    # Prediction from a trained job: images may be larger than other request bodies.
    max_image_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="largest image a prediction request may send"
    )

    # The command line and Python client: which server to talk to, and as whom.
    url: str = Field("http://127.0.0.1:8000", description="base URL of the mnistq server")
    token: SecretStr | None = Field(None, description="API token (default: var/admin-token)")

    # Limits and exposure of the HTTP API.
    max_queued_jobs_per_user: int = Field(100, ge=1, description="queued jobs one user may have")
    max_running_jobs_per_user: int | None = Field(
        None,
        ge=1,
        description="jobs of one user running at once (workers enforce it); unset: no cap",
    )
    submit_rate_limit: str = Field(
        "30/minute", min_length=1, description="job submissions per token, e.g. '30/minute'"
    )
    cors_origins: str = Field(
        "", description="comma-separated origins allowed cross-origin calls; empty: CORS off"
    )
    secret_key: SecretStr | None = Field(
        None,
        min_length=32,
        description="signs the dashboard's session cookie; unset: a random key kept in var_dir",
    )
    session_idle_hours: float = Field(
        12.0, gt=0, description="a dashboard session unused this long ends; sign in again"
    )
    session_cookie_secure: bool = Field(
        False, description="send the session cookie over HTTPS only (on behind TLS)"
    )

    def threads_per_job(self, concurrency: int) -> int:
        """torch threads for each of ``concurrency`` jobs: the setting, or the cores shared."""
        # 0 splits the cores among the worker's slots: on a 2-core machine two 1-thread jobs
        # finish about 1.5x the jobs per hour of one 2-thread job (bench/train_speed.py).
        return self.train_threads or max(1, usable_cores() // max(1, concurrency))

    @property
    def broker_dir(self) -> Path:
        """Folder the embedded ``filesystem://`` broker keeps its messages in."""
        return self.var_dir / "broker"

    @property
    def admin_token_path(self) -> Path:
        """Where `mnistq up` keeps the token of the admin it creates (mode 0600)."""
        return self.var_dir / "admin-token"

    @property
    def secret_key_path(self) -> Path:
        """Where the generated session key lives when ``secret_key`` is unset (mode 0600)."""
        return self.var_dir / "secret-key"

    @property
    def session_idle(self) -> timedelta:
        """How long an unused dashboard session lives."""
        return timedelta(hours=self.session_idle_hours)

    @property
    def cors_origin_list(self) -> list[str]:
        """The allowed CORS origins; none means no cross-origin access."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def ratelimit_storage_uri(self) -> str:
        """Rate-limit counters: the broker's Redis (shared by all API processes), else memory."""
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return "memory://"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
