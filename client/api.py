"""The Python client of the mnistq HTTP API: typed results, one exception per kind of failure."""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, get_args

import requests
from pydantic import BaseModel

from client.events import ServerEvent, lines, parse
from shared.artifacts import validate_name
from shared.schemas import (
    ArtifactListOut,
    ArtifactOut,
    JobOut,
    JobPageOut,
    JobStatusName,
    LogLineOut,
    LogPageOut,
    MetricsOut,
    PredictionOut,
    ProgressOut,
    QueueListOut,
    QueueOut,
    WorkerListOut,
    WorkerOut,
)
from shared.sweep_schemas import SweepOut, SweepPageOut, TrialListOut, TrialOut

M = TypeVar("M", bound=BaseModel)
Job = JobOut
Prediction = PredictionOut
Sweep = SweepOut
Trial = TrialOut
FINISHED = frozenset(get_args(JobStatusName)) - {"queued", "running"}
TIMEOUT_SECONDS = 30.0
CHUNK = 1 << 20
# A stream sends a keep-alive every 15 s: one silent for this long is dead.
STREAM_READ_TIMEOUT_SECONDS = 60.0
STREAM_RETRIES = 5  # reconnects in a row without an event before giving up on the stream
# (artifact name, bytes written so far, total bytes) while a file downloads.
DownloadProgress = Callable[[str, int, int], None]


class ClientError(Exception):
    """A request that did not succeed; ``status``, ``code`` and ``details`` from the server."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details


class ServerUnavailable(ClientError):
    """The server cannot be reached, or says its database or broker is down (503)."""


class AuthenticationFailed(ClientError):
    """No token, or one the server does not accept (401)."""


class PermissionDenied(ClientError):
    """The token's user may not do this (403)."""


class NotFound(ClientError):
    """No such job, sweep or artifact, or one the caller may not see (404)."""


class ValidationFailed(ClientError):
    """The server refused the request's fields (400/422); ``details`` names each one."""

    @property
    def fields(self) -> list[str]:
        """Each bad field as ``loc: msg``."""
        details = self.details if isinstance(self.details, list) else []
        return [
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg', '')}"
            for d in details
            if isinstance(d, dict)
        ]


class Conflict(ClientError):
    """The job's or sweep's state does not allow this (409), e.g. cancelling a finished job."""


class ChecksumMismatch(ClientError):
    """A downloaded file's sha256 differs from the server's listing."""


_BY_STATUS: dict[int, type[ClientError]] = {
    400: ValidationFailed,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    503: ServerUnavailable,
}


def error_from_response(response: requests.Response) -> ClientError:
    """The ClientError for a failed response, carrying the server's JSON error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"message": response.text.strip()[:200] or response.reason}
    message = str(body.get("message") or response.reason)
    kind = _BY_STATUS.get(response.status_code, ClientError)
    return kind(
        message, status=response.status_code, code=body.get("error"), details=body.get("details")
    )


class Client:
    """An mnistq server at ``url``, called with the API token ``token``."""

    def __init__(self, url: str, token: str | None, *, timeout: float = TIMEOUT_SECONDS) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()
        if token:
            self.http.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send a request under /api/v1; a ClientError for anything but a 2xx answer."""
        url = f"{self.url}/api/v1{path}"
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.http.request(method, url, **kwargs)
        except requests.ConnectionError as exc:
            raise ServerUnavailable(f"cannot reach the mnistq server at {self.url}") from exc
        except requests.Timeout as exc:
            raise ServerUnavailable(f"the mnistq server at {self.url} did not answer") from exc
        if not response.ok:
            raise error_from_response(response)
        return response

    def _json(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self._request(method, path, **kwargs).json())

    def submit(
        self,
        hyperparameters: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        resume_from: str | None = None,
        resume_epoch: int | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> Job:
        """Submit a training job; hyperparameters left out take the server's defaults."""
        body: dict[str, Any] = {"hyperparameters": hyperparameters or {}}
        if name is not None:
            body["name"] = name
        if priority is not None:
            body["priority"] = priority
        if resume_from is not None:
            body["resume_from"] = {"job_id": resume_from, "epoch": resume_epoch}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(Job, "POST", "/jobs", json=body, headers=headers)

    def set_priority(self, job_id: str, priority: int) -> Job:
        """Change a queued job's priority (larger runs first)."""
        return self._json(Job, "PATCH", f"/jobs/{job_id}", json={"priority": priority})

    def workers(self) -> builtins.list[WorkerOut]:
        """Every worker seen in the last hour: queues, slots, jobs, last seen, state."""
        return self._json(WorkerListOut, "GET", "/workers").items

    def drain_worker(self, worker_id: str) -> WorkerOut:
        """Ask a worker to finish its jobs, take no new one and exit (admins only)."""
        return self._json(WorkerOut, "POST", f"/workers/{worker_id}/drain")

    def queues(self) -> builtins.list[QueueOut]:
        """Per queue: queued, running, the oldest wait, live workers."""
        return self._json(QueueListOut, "GET", "/queues").items

    def get(self, job_id: str) -> Job:
        """The job as the server shows it now."""
        return self._json(Job, "GET", f"/jobs/{job_id}")

    def list(
        self,
        *,
        status: Iterable[str] = (),
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPageOut:
        """One page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next."""
        params: dict[str, Any] = {"status": list(status)}
        if limit is not None:
            params["limit"] = limit
        if cursor is not None:
            params["cursor"] = cursor
        return self._json(JobPageOut, "GET", "/jobs", params=params)

    def iter_jobs(self, *, status: Iterable[str] = (), limit: int | None = None) -> Iterator[Job]:
        """Every job, newest first, following the cursor page after page."""
        wanted, cursor = list(status), None
        while True:
            page = self.list(status=wanted, limit=limit, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def wait(
        self,
        job_id: str,
        on_update: Callable[[Job], None] | None = None,
        poll: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled; ``on_update`` sees each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout}s")
            time.sleep(poll)

    def follow(
        self, job_id: str, on_update: Callable[[Job], None] | None = None, poll: float = 1.0
    ) -> Job:
        """Like ``wait``, driven by the job's event stream; polls only where the stream fails."""
        job = self.get(job_id)
        if on_update is not None:
            on_update(job)
        if job.status in FINISHED:
            return job
        try:
            for event in self.events(job_id):
                job = self._apply(job_id, job, event)
                if on_update is not None and event.event in ("status", "progress", "metric"):
                    on_update(job)
        except ServerUnavailable:
            pass  # no stream (an old server, a proxy that buffers): fall back to polling
        return self.wait(job_id, on_update=on_update, poll=poll)

    def _apply(self, job_id: str, job: Job, event: ServerEvent) -> Job:
        """The job after ``event``: progress in place, anything else read again."""
        if event.event == "progress":
            progress = ProgressOut.model_validate(event.data)
            return job.model_copy(update={"progress": progress,
                                          "train_loss": event.data.get("train_loss")})  # fmt: skip
        if event.event in ("status", "end") or (
            event.event == "metric" and event.data.get("kind") == "test"
        ):
            return self.get(job_id)
        return job

    def events(
        self, job_id: str | None = None, *, after: int | None = None
    ) -> Iterator[ServerEvent]:
        """A job's live events (None: all jobs'), reconnecting with Last-Event-ID, to ``end``."""
        path = f"/jobs/{job_id}/events" if job_id else "/events"
        last, retries = after, 0
        while retries <= STREAM_RETRIES:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                for event in self._stream(path, headers):
                    retries = 0
                    last = event.id if event.id is not None else last
                    yield event
                    if event.event == "end":
                        return
            except (ServerUnavailable, requests.RequestException):
                retries += 1
                time.sleep(min(2.0, 0.2 * 2**retries))
        raise ServerUnavailable(f"the event stream of {self.url} keeps failing")

    def _stream(self, path: str, headers: dict[str, str]) -> Iterator[ServerEvent]:
        timeout = (self.timeout, STREAM_READ_TIMEOUT_SECONDS)
        with self._request("GET", path, stream=True, headers=headers, timeout=timeout) as response:
            # chunk_size None: each chunk as it arrives, not once 512 bytes have come.
            yield from parse(lines(response.iter_content(chunk_size=None)))

    def logs(self, job_id: str, *, after: int = 0, limit: int | None = None) -> LogPageOut:
        """A page of the job's log lines after ``after``."""
        params: dict[str, Any] = {"after": after}
        if limit is not None:
            params["limit"] = limit
        return self._json(LogPageOut, "GET", f"/jobs/{job_id}/logs", params=params)

    def follow_logs(self, job_id: str, *, poll: float = 1.0) -> Iterator[LogLineOut]:
        """Every line of the job's log, then new ones as they are written, until it ends."""
        after = 0
        try:
            for event in self.events(job_id, after=0):
                if event.event == "log":
                    line = LogLineOut.model_validate({**event.data, "seq": event.id})
                    after = line.seq
                    yield line
            return
        except ServerUnavailable:
            pass  # the stream failed: poll the log from where it got to
        while True:
            page = self.logs(job_id, after=after)
            yield from page.lines
            after = page.next_after
            if page.complete:
                return
            if not page.lines:
                time.sleep(poll)

    def metrics(self, job_id: str, *, max_points: int | None = None) -> MetricsOut:
        """The whole train-loss series (every page of it, or thinned to about ``max_points``)
        and the per-epoch test series."""
        path = f"/jobs/{job_id}/metrics"
        if max_points is not None:
            return self._json(MetricsOut, "GET", path, params={"max_points": max_points})
        first = page = self._json(MetricsOut, "GET", path)
        train = list(first.train)
        while page.next_after_step is not None:
            params = {"after_step": page.next_after_step}
            page = self._json(MetricsOut, "GET", path, params=params)
            train += page.train
        # The first page holds every test point; later pages repeat the ones after them.
        return first.model_copy(update={"train": train, "next_after_step": None})

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job, or ask a running one to stop; Conflict for a finished one."""
        return self._json(Job, "POST", f"/jobs/{job_id}/cancel")

    def artifacts(self, job_id: str) -> builtins.list[ArtifactOut]:
        """Name, kind, size and sha256 of each file the job produced."""
        return self._json(ArtifactListOut, "GET", f"/jobs/{job_id}/artifacts").items

    def download(
        self,
        job_id: str,
        names: Iterable[str] | None = None,
        dest: Path | str = ".",
        on_progress: DownloadProgress | None = None,
    ) -> builtins.list[Path]:
        """Fetch artifacts (all by default) into ``dest``, each checked against its sha256."""
        listing = {a.name: a for a in self.artifacts(job_id)}
        wanted = list(listing) if names is None else list(names)
        missing = [name for name in wanted if name not in listing]
        if missing:
            raise NotFound(f"job {job_id} has no artifact {', '.join(map(repr, missing))}")
        return [self._fetch(job_id, listing[n], Path(dest), on_progress) for n in wanted]

    def _fetch(
        self, job_id: str, artifact: ArtifactOut, dest: Path, on_progress: DownloadProgress | None
    ) -> Path:
        """Stream one file to a temporary name beside its target, verify it, then rename."""
        target = dest / validate_name(artifact.name)  # a name cannot lead out of dest
        target.parent.mkdir(parents=True, exist_ok=True)
        path = f"/jobs/{job_id}/artifacts/{artifact.name}"
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, self._request("GET", path, stream=True) as response:
                digest = _copy(response, out, artifact, on_progress)
            if digest != artifact.sha256:
                raise ChecksumMismatch(
                    f"{artifact.name}: sha256 {digest} differs from the server's {artifact.sha256}"
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return target

    def predict(self, job_id: str, image_bytes: bytes, content_type: str = "") -> Prediction:
        """The digit a succeeded job's model sees in a PNG or JPEG image."""
        media = content_type or _image_type(image_bytes)
        return self._json(
            Prediction,
            "POST",
            f"/jobs/{job_id}/predict",
            data=image_bytes,
            headers={"Content-Type": media},
        )

    def create_sweep(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> Sweep:
        """Start a sweep from its JSON spec (method, metric, parameters, base, budget, ...)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json(Sweep, "POST", "/sweeps", json=spec, headers=headers)

    def sweep(self, sweep_id: str) -> Sweep:
        """The sweep as the server shows it now: state, counts, best trial."""
        return self._json(Sweep, "GET", f"/sweeps/{sweep_id}")

    def sweeps(
        self, *, status: Iterable[str] = (), limit: int | None = None
    ) -> builtins.list[Sweep]:
        """Sweeps, newest first."""
        params: dict[str, Any] = {"status": list(status)}
        if limit is not None:
            params["limit"] = limit
        return self._json(SweepPageOut, "GET", "/sweeps", params=params).items

    def sweep_trials(self, sweep_id: str) -> builtins.list[Trial]:
        """The sweep's trials, best first, each with its job."""
        return self._json(TrialListOut, "GET", f"/sweeps/{sweep_id}/trials").items

    def cancel_sweep(self, sweep_id: str) -> Sweep:
        """Cancel a running sweep: queued trials now, running ones at their next heartbeat."""
        return self._json(Sweep, "POST", f"/sweeps/{sweep_id}/cancel")

    def wait_sweep(
        self,
        sweep_id: str,
        on_update: Callable[[Sweep], None] | None = None,
        poll: float = 2.0,
        timeout: float | None = None,
    ) -> Sweep:
        """Poll until the sweep is no longer running; ``on_update`` sees each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.sweep(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.status != "running":
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} is still running after {timeout}s")
            time.sleep(poll)


def _copy(
    response: requests.Response,
    out: Any,
    artifact: ArtifactOut,
    on_progress: DownloadProgress | None,
) -> str:
    """Write the response body to ``out`` in chunks; its sha256 hex digest."""
    digest = hashlib.sha256()
    done = 0
    for chunk in response.iter_content(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if on_progress is not None:
            on_progress(artifact.name, done, artifact.size)
    return digest.hexdigest()


def _image_type(data: bytes) -> str:
    """image/png or image/jpeg from the file's signature; PNG when it is neither."""
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
