"""Hyperparameters: the one validated description of a training run, shared by API and worker."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

ModelName = Literal["tutorial_cnn", "fast_cnn"]
OptimizerName = Literal["sgd", "adam", "adamw"]
Device = Literal["auto", "cpu", "cuda"]


# The range of a job's priority (POST /jobs, PATCH /jobs/<id>).
MIN_PRIORITY, MAX_PRIORITY = -100, 100


class Hyperparameters(BaseModel):
    """A training run's knobs, with the classic PyTorch MNIST recipe as the defaults."""

    # Strict: unknown keys, NaN/inf and silently coerced strings are errors, not guesses.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    n_epochs: int = Field(3, ge=1, le=100, description="passes over the training set")
    batch_size_train: int = Field(64, ge=1, le=8192, description="training batch size")
    batch_size_test: int = Field(1000, ge=1, le=10000, description="evaluation batch size")
    learning_rate: float = Field(0.01, gt=0, le=10, description="optimizer step size")
    momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum (adam/adamw: beta1)")
    log_interval: int = Field(10, ge=1, le=10000, description="batches between train-loss logs")
    random_seed: int = Field(1, ge=0, le=2**31 - 1, description="seeds torch and the shuffles")
    model: ModelName = Field("tutorial_cnn", description="network architecture")
    optimizer: OptimizerName = Field("sgd", description="optimizer")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 penalty")
    lr_gamma: float = Field(
        1.0, gt=0, le=1, description="learning-rate decay per epoch (1 = constant)"
    )
    device: Device = Field("auto", description="auto picks CUDA when the worker has it")


# --- HTTP request and response bodies (the OpenAPI document is generated from these) -------

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled", "pruned"]
ArtifactKind = Literal["checkpoint", "model", "plot", "log"]
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


# Control (Cc), format (Cf: bidirectional overrides and isolates, zero-width characters, BOM),
# surrogate (Cs), line and paragraph separator (Zl, Zp) characters. In a name they hide text,
# reorder it on screen (U+202E shows "exe.txt" for "txt.exe") or break lines in lists and logs.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def plain_text(value: str) -> str:
    """``value`` unless it holds a character that is invisible or reorders or breaks the text."""
    for ch in value:
        if unicodedata.category(ch) in HIDDEN_CATEGORIES:
            raise ValueError(
                f"must not contain control, bidirectional, zero-width or line-separator "
                f"characters (found U+{ord(ch):04X})"
            )
    return value


# A label people give a job or a sweep: what the lists show. Sweep names use it too.
Name = Annotated[str, Field(max_length=200), AfterValidator(plain_text)]


class ResumeFrom(BaseModel):
    """Continue training from an epoch checkpoint of an earlier job."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN, description="the job whose checkpoint to load")
    epoch: int | None = Field(
        None, ge=1, le=100, description="checkpoint epoch; the newest checkpoint when omitted"
    )


class JobCreate(BaseModel):
    """The body of POST /api/v1/jobs."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Name | None = Field(None, description="a label for people")
    hyperparameters: Hyperparameters = Field(
        default_factory=lambda: Hyperparameters.model_validate({}),
        description="omitted keys take the seed recipe's values",
    )
    device: Device | None = Field(
        None, description="shorthand for hyperparameters.device; both given must agree"
    )
    resume_from: ResumeFrom | None = None
    priority: int = Field(
        0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
        description="larger runs first; among equal priorities the oldest job runs first",
    )  # fmt: skip

    @field_validator("device")
    @classmethod
    def _device_agrees(cls, device: Device | None, info: ValidationInfo) -> Device | None:
        hp = info.data.get("hyperparameters")
        if device and hp and "device" in hp.model_fields_set and hp.device != device:
            raise ValueError(f"{device!r} conflicts with hyperparameters.device {hp.device!r}")
        return device

    @model_validator(mode="after")
    def _merge_device(self) -> JobCreate:
        # One place holds the device from here on: the hyperparameters the worker reads.
        if self.device is not None and self.device != self.hyperparameters.device:
            self.hyperparameters = self.hyperparameters.model_copy(update={"device": self.device})
        self.device = self.hyperparameters.device
        return self


class ListJobsQuery(BaseModel):
    """Query parameters of GET /api/v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    status: list[JobStatusName] | None = Field(None, description="repeat to match several")
    limit: int | None = Field(None, ge=1, le=500, description="page size")
    cursor: str | None = Field(None, max_length=512, description="next_cursor of the last page")


def progress_figures(
    samples_seen: int,
    total_samples: int,
    samples_per_second: float | None,
    *,
    running: bool,
    succeeded: bool = False,
) -> tuple[float, float | None]:
    """(fraction done 0..1, seconds left at the current speed while running)."""
    if total_samples > 0:
        fraction = min(1.0, samples_seen / total_samples)
    else:
        fraction = 1.0 if succeeded else 0.0
    speed = samples_per_second
    eta = None
    if running and speed and total_samples > 0:
        eta = max(0.0, (total_samples - samples_seen) / speed)
    return fraction, eta


MAX_METRIC_PAGE = 10_000


class MetricsQuery(BaseModel):
    """Query parameters of GET /api/v1/jobs/<id>/metrics."""

    model_config = ConfigDict(extra="forbid")

    after_step: int | None = Field(
        None, ge=0, description="only points after this global step (next_after_step of a page)"
    )
    limit: int | None = Field(
        None, ge=1, le=MAX_METRIC_PAGE,
        description=f"most train points in the answer (default and at most {MAX_METRIC_PAGE})",
    )  # fmt: skip
    max_points: int | None = Field(
        None, ge=2, le=MAX_METRIC_PAGE,
        description="thin the train series to about this many points, evenly spread, the "
        "first and last kept (for a chart); the whole series, not one page",
    )  # fmt: skip


class ProgressOut(BaseModel):
    """How far a job is: the latest progress the worker wrote."""

    epoch: int
    n_epochs: int
    step: int
    steps_per_epoch: int
    samples_seen: int
    total_samples: int
    fraction: float = Field(description="samples_seen / total_samples, 0..1")
    samples_per_second: float | None
    eta_seconds: float | None = Field(description="remaining samples at the current speed")


class TestMetricOut(BaseModel):
    """One epoch's evaluation on the test set."""

    epoch: int
    loss: float
    accuracy: float | None


class MetricPointOut(BaseModel):
    """One point of a metric series."""

    epoch: int
    step: int
    samples_seen: int
    loss: float
    accuracy: float | None
    seconds: float


class MetricsOut(BaseModel):
    """The train-loss series (every log interval) and the test series (every epoch)."""

    job_id: str
    train: list[MetricPointOut]
    test: list[MetricPointOut]
    next_after_step: int | None = Field(
        None, description="more train points follow: pass this as after_step for the next page"
    )


class JobErrorOut(BaseModel):
    """Why a job failed."""

    message: str | None
    traceback: str | None


class ResumeFromOut(BaseModel):
    """The checkpoint a job started from."""

    job_id: str
    epoch: int | None


class ArtifactOut(BaseModel):
    """A file a job produced, with where to download it."""

    name: str
    kind: str
    size: int
    sha256: str
    created_at: datetime
    url: str


class ArtifactListOut(BaseModel):
    """The artifacts of one job."""

    job_id: str
    items: list[ArtifactOut]


class JobLinksOut(BaseModel):
    """Where to go next from a job."""

    model_config = ConfigDict(populate_by_name=True)

    self_: str = Field(alias="self")
    metrics: str
    artifacts: str
    cancel: str


class JobPatch(BaseModel):
    """The body of PATCH /api/v1/jobs/<id>: what may change while a job waits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    priority: int = Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, description="the new priority")


class LeaseOut(BaseModel):
    """Who holds a running job and until when; ``expired`` once its worker stopped beating."""

    worker_id: str | None = Field(description="registry id of the worker that runs it")
    pid: int | None = Field(description="process id of the training process")
    expires_at: datetime | None
    expired: bool = Field(description="the heartbeat stopped: a reaper requeues it shortly")
    message: str | None


class QueueStatusOut(BaseModel):
    """Where a queued job waits: its place in its queue and how many live workers serve it."""

    position: int = Field(description="1 = next to be taken from its queue")
    live_workers: int = Field(description="workers alive now that consume from this queue")
    message: str | None = Field(description="why it may wait forever, e.g. no worker serves it")


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    name: str | None
    status: JobStatusName
    hyperparameters: dict[str, Any]
    device_requested: str
    device_used: str | None
    queue: str
    priority: int
    attempt: int
    worker: str | None
    cancel_requested: bool
    sweep_id: str | None = Field(None, description="the sweep this job is a trial of")
    trial_number: int | None = Field(None, description="its number within that sweep")
    created_at: datetime
    queued_at: datetime | None
    published_at: datetime | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    progress: ProgressOut
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    test_metrics: list[TestMetricOut]
    error: JobErrorOut | None
    resume_from: ResumeFromOut | None
    artifacts: list[ArtifactOut]
    links: JobLinksOut
    queue_status: QueueStatusOut | None = Field(None, description="only while queued")
    lease: LeaseOut | None = Field(None, description="only while running")


class JobPageOut(BaseModel):
    """One page of the job list, newest first."""

    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null at end")


class PredictionOut(BaseModel):
    """The digit a job's trained model sees in an image, with every class's probability."""

    job_id: str
    digit: int = Field(ge=0, le=9, description="the most likely digit")
    probabilities: list[float] = Field(
        min_length=10, max_length=10, description="probability of each digit 0..9"
    )
    model: str = Field(description="the network, e.g. tutorial_cnn")
    epoch: int | None = Field(description="the last epoch the model was trained for")
    sha256: str = Field(description="sha256 of the model.pth that answered")


class ErrorOut(BaseModel):
    """Every error response."""

    error: str = Field(description="a short code, e.g. validation_error")
    message: str = Field(description="a sentence for people")
    details: Any = Field(None, description="for validation errors: [{loc, msg, type}]")


class ComponentHealthOut(BaseModel):
    """Whether one dependency answered."""

    ok: bool
    error: str | None = Field(None, description="'unreachable' when down; the reason is logged")


class HealthOut(BaseModel):
    """Reachability of the database and the broker."""

    status: Literal["ok", "unavailable"]
    database: ComponentHealthOut
    broker: ComponentHealthOut


class TokenOut(BaseModel):
    """An API token as listings show it: never the secret, which is shown once at creation."""

    id: str = Field(description="public id, for revoking")
    created_at: datetime
    revoked_at: datetime | None


class UserOut(BaseModel):
    """A user and their tokens."""

    name: str
    is_admin: bool
    created_at: datetime
    tokens: list[TokenOut]


class UserListOut(BaseModel):
    """Every user (admins only)."""

    items: list[UserOut]


MAX_EVENT_ID = 2**62  # event ids are database integers; larger ones cannot be ours


class LogQuery(BaseModel):
    """Query parameters of GET /api/v1/jobs/<id>/logs."""

    model_config = ConfigDict(extra="forbid")

    after: int = Field(0, ge=0, le=MAX_EVENT_ID, description="give lines with seq above this")
    limit: int = Field(1000, ge=1, le=1000, description="at most this many lines")


class LogLineOut(BaseModel):
    """One line of a job's log."""

    seq: int = Field(description="increases along the log; pass it as after= to continue")
    time: datetime
    attempt: int = Field(description="the attempt that wrote it (0: before the first claim)")
    message: str


class LogPageOut(BaseModel):
    """A page of a job's log."""

    lines: list[LogLineOut]
    next_after: int = Field(description="the after= of the next page")
    complete: bool = Field(description="the job is finished and no line follows these")


class EventsQuery(BaseModel):
    """Query parameters of the event streams (Last-Event-ID, when sent, wins)."""

    model_config = ConfigDict(extra="forbid")

    after: int | None = Field(
        None, ge=0, le=MAX_EVENT_ID, description="replay events with an id above this"
    )


class WorkerOut(BaseModel):
    """A worker process as the registry knows it."""

    id: str
    name: str = Field(description="the Celery node name, e.g. celery@host")
    hostname: str
    pid: int
    queues: list[str]
    slots: int = Field(description="jobs it runs at once")
    jobs: list[str] = Field(description="ids of the jobs it runs now (a user sees their own)")
    started_at: datetime
    last_seen_at: datetime
    state: Literal["live", "draining", "lost"] = Field(
        description="lost: it missed its heartbeats (killed, or its machine is gone)"
    )


class WorkerListOut(BaseModel):
    """Every worker seen in the last hour, oldest first."""

    items: list[WorkerOut]


class QueueOut(BaseModel):
    """One queue: what waits, what runs, the oldest wait and the live workers serving it."""

    name: str
    queued: int
    running: int
    oldest_wait_seconds: float | None = Field(description="how long the oldest queued job waits")
    live_workers: int


class QueueListOut(BaseModel):
    """Every queue."""

    items: list[QueueOut]


WebhookEventName = Literal["job.succeeded", "job.failed", "job.cancelled", "sweep.completed"]


class WebhookCreate(BaseModel):
    """Body of POST /api/v1/webhooks."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL events are posted to")
    events: list[WebhookEventName] = Field(min_length=1, max_length=4)
    description: str | None = Field(None, max_length=200)


class WebhookOut(BaseModel):
    """A webhook endpoint (its secret is shown only when it is created)."""

    id: str
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    disabled_at: datetime | None = Field(description="set when a receiver answered 410 Gone")
    disabled_reason: str | None


class WebhookCreatedOut(WebhookOut):
    """A new endpoint with its signing secret: shown this once."""

    secret: str = Field(description="whsec_…: verify each delivery's webhook-signature with it")


class WebhookListOut(BaseModel):
    """The caller's endpoints."""

    items: list[WebhookOut]


class WebhookTryOut(BaseModel):
    """One try of a delivery."""

    number: int
    time: datetime
    outcome: Literal["succeeded", "failed", "gone", "refused"]
    status_code: int | None
    error: str | None
    duration_ms: float | None


class WebhookDeliveryOut(BaseModel):
    """One event sent (or being sent) to an endpoint, with every try."""

    id: str = Field(description="the webhook-id header")
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="when the next try is due, if pending")
    created_at: datetime
    finished_at: datetime | None
    payload: dict[str, Any]
    tries: list[WebhookTryOut]


class WebhookDeliveryListOut(BaseModel):
    """The endpoint's newest deliveries, newest first."""

    items: list[WebhookDeliveryOut]
