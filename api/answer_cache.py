"""Finished jobs' JSON answers, kept by each API process: a finished job never changes.

Once a job has finished nothing writes to it again: its progress, metrics, log and
artifacts are written under its lease, which ends with it, and continuing its training is
a new job. Deleting it is the one change left. So ``GET /api/v1/jobs/<id>`` of a finished
job needs only to know that the row is still there, still finished the same way and visible
to the caller: one indexed lookup of three columns instead of the job, its artifacts and its
test metrics as objects, and no serialization. Queued and running jobs, which change, are
never kept. At most ``size`` answers are kept, the least recently used let go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from flask import Flask, Response, current_app
from sqlalchemy import Connection, bindparam, select

from shared.models import Job, JobStatus

KEY = "mnistq.answers"
DEFAULT_SIZE = 10_000  # about 1.3 kB each: some 13 MB per API process at most

# Built once: what a kept answer was made from, as the row has it now.
_ROW_NOW = select(Job.status, Job.finished_at, Job.owner_id).where(Job.id == bindparam("job_id"))


@dataclass(frozen=True)
class Answer:
    """A finished job's answer, and what it was made from."""

    status: str
    finished_at: datetime | None
    owner_id: int | None  # None: a job only admins see
    body: bytes
    etag: str


class FinishedJobAnswers:
    """An LRU of finished jobs' answers, safe for the threads or greenlets of one process."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, connection: Connection, job_id: str, owner_id: int | None) -> Answer | None:
        """The kept answer if the job is still there, finished as it was, and the caller's
        (``owner_id`` None: an admin's, every job); else None (the full path decides)."""
        with self._lock:
            kept = self._answers.get(job_id)
            if kept is not None:
                self._answers.move_to_end(job_id)
        if kept is None or (owner_id is not None and kept.owner_id != owner_id):
            return None
        row = connection.execute(_ROW_NOW, {"job_id": job_id}).first()
        if row is None or (row.status, row.finished_at, row.owner_id) != (
            kept.status, kept.finished_at, kept.owner_id,
        ):  # fmt: skip
            self.forget(job_id)
            return None
        return kept

    def keep(self, job: Job, response: Response) -> None:
        """Remember the answer ``response`` gave for ``job`` if the job is finished."""
        etag, _weak = response.get_etag()
        if not JobStatus(job.status).finished or etag is None:
            return
        answer = Answer(job.status, job.finished_at, job.owner_id, response.get_data(), etag)
        with self._lock:
            self._answers[job.id] = answer
            self._answers.move_to_end(job.id)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._answers.pop(job_id, None)


def init_app(app: Flask, size: int = DEFAULT_SIZE) -> None:
    app.extensions[KEY] = FinishedJobAnswers(size)


def finished_answers() -> FinishedJobAnswers:
    """The current app's kept answers."""
    found: FinishedJobAnswers = current_app.extensions[KEY]
    return found
