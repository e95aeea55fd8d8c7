"""Artifact names, kinds and atomic local writes; the stores themselves are in shared.store."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

# One path part: starts with a letter, digit or underscore (so no "..", no hidden files),
# then only characters that need no quoting in a URL or a shell.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_NAME_LENGTH = 255
MAX_DEPTH = 2  # "model.pth" or "checkpoints/epoch-1.pt"
_CHUNK = 1 << 20


class InvalidArtifactName(ValueError):
    """A name that could point outside its job's folder or is not a plain relative path."""


class ArtifactNotFound(LookupError):
    """The job has no such artifact."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe relative name like ``checkpoints/epoch-1.pt``; else raise."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArtifactName(f"artifact name must be 1 to {MAX_NAME_LENGTH} characters")
    parts = name.split("/")
    for part in parts:
        if not _PART.fullmatch(part):
            raise InvalidArtifactName(
                f"artifact name part {part!r} is empty or has characters other than "
                "letters, digits, '.', '_' and '-', or starts with '.' or '-'"
            )
    if len(parts) > MAX_DEPTH:
        raise InvalidArtifactName(f"artifact name may have at most {MAX_DEPTH - 1} '/'")
    return name


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it can name a folder safely; else raise InvalidArtifactName."""
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArtifactName(f"job id {job_id!r} is not a valid folder name")
    return job_id


def artifact_kind(name: str) -> str:
    """The kind of an artifact from its name: checkpoint, model, plot or log."""
    path = PurePosixPath(name)
    if path.parts[0] == "checkpoints":
        return "checkpoint"
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return "model"
    if suffix in (".png", ".svg", ".jpg", ".jpeg"):
        return "plot"
    return "log"


def checkpoint_name(epoch: int) -> str:
    """The artifact name of the checkpoint written after ``epoch``."""
    return f"checkpoints/epoch-{epoch}.pt"


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary file whose content replaces ``path`` whole when the block ends without error.

    Written under a temp name in the same folder, fsynced, then renamed: a reader (the API
    serving a download, a worker resuming) sees the old file or the new one, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_writer(path) as out:
        out.write(data)


def describe(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of the file at ``path``."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
