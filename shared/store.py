"""Where artifacts live: a local folder (the embedded default) or S3-compatible object storage.

Workers never write into the store directly: training writes to a scratch folder on the
worker's own disk, and each finished file is uploaded whole with ``put``. Readers (the API
serving a download, a worker resuming on another machine, prediction) go through ``open``
or ``fetch``. So workers on other machines need no folder in common with the API.

The store is chosen by ``MNISTQ_ARTIFACT_URL``: ``s3://bucket/prefix`` for object storage
(``MNISTQ_S3_ENDPOINT_URL`` for a server other than AWS; credentials from the usual
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``), a plain path or
``file://`` URL for a folder; unset, the folder ``MNISTQ_ARTIFACT_DIR``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from urllib.parse import urlparse

from shared.artifacts import (
    ArtifactNotFound,
    InvalidArtifactName,
    atomic_writer,
    validate_job_id,
    validate_name,
)

if TYPE_CHECKING:
    from shared.config import Settings

_CHUNK = 1 << 20


class StoreUnavailable(Exception):
    """The artifact store did not answer (after retries): try again later."""


class ArtifactStore(Protocol):
    """What every artifact store does; names are checked with ``validate_name``."""

    def put(self, job_id: str, name: str, source: Path, *, sha256: str) -> None:
        """Store the local file ``source`` whole as artifact ``name`` of ``job_id``."""

    def open(self, job_id: str, name: str) -> Any:
        """A context manager yielding a binary stream of the artifact; ArtifactNotFound."""

    def fetch(self, job_id: str, name: str, dest: Path) -> Path:
        """Download the artifact to the local file ``dest`` (atomically) and return it."""

    def list(self, job_id: str) -> list[str]:
        """The names stored for ``job_id``, sorted."""

    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of ``job_id``; nothing happens if there is none."""


def _checked(job_id: str, name: str) -> tuple[str, str]:
    return validate_job_id(job_id), validate_name(name)


class LocalStore:
    """Files of each job under ``root/<job_id>/``; every path is checked to stay in ``root``."""

    def __init__(self, root: Path) -> None:
        # Absolute and resolved from the start: a relative root (the embedded default
        # var/artifacts) would be read against whatever folder a library resolves it from,
        # and the containment check compares against the real root.
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, job_id: str, name: str) -> Path:
        job_id, name = _checked(job_id, name)
        path = self.root / job_id / name
        # resolve() follows symlinks: a link planted anywhere below the root (the job's
        # folder itself included) cannot lead a read or a write out of the store.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise InvalidArtifactName(f"artifact {name!r} resolves outside the artifact store")
        return path

    def put(self, job_id: str, name: str, source: Path, *, sha256: str) -> None:
        """Copy ``source`` in atomically: readers see the old file or the whole new one."""
        path = self._path(job_id, name)
        with source.open("rb") as src, atomic_writer(path) as out:
            shutil.copyfileobj(src, out, _CHUNK)

    @contextmanager
    def open(self, job_id: str, name: str) -> Iterator[BinaryIO]:
        """The file opened for reading."""
        path = self._path(job_id, name)
        if not path.is_file():
            raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
        with path.open("rb") as stream:
            yield stream

    def fetch(self, job_id: str, name: str, dest: Path) -> Path:
        """Copy the artifact to ``dest``."""
        with self.open(job_id, name) as src, atomic_writer(dest) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return dest

    def list(self, job_id: str) -> list[str]:
        """Names of the regular files in the job's folder (at most one level deep)."""
        folder = self.root / validate_job_id(job_id)
        if not folder.is_dir():
            return []
        names = []
        for path in folder.rglob("*"):
            name = path.relative_to(folder).as_posix()
            if path.is_file() and not path.name.startswith("."):
                try:
                    names.append(self._path(job_id, name).relative_to(folder).as_posix())
                except InvalidArtifactName:
                    continue
        return sorted(names)

    def delete_job(self, job_id: str) -> None:
        """Remove the job's folder and everything in it."""
        folder = self.root / validate_job_id(job_id)
        if folder.is_symlink():
            folder.unlink()
        elif folder.exists():
            shutil.rmtree(folder)


class S3Store:
    """Objects ``<prefix>/<job_id>/<name>`` in one bucket of an S3-compatible server."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None
    ) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client if client is not None else _s3_client(endpoint_url)

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}', endpoint_url={self.endpoint_url!r})"

    def key(self, job_id: str, name: str) -> str:
        """The object key of an artifact."""
        job_id, name = _checked(job_id, name)
        return "/".join(filter(None, (self.prefix, job_id, name)))

    def _job_prefix(self, job_id: str) -> str:
        return "/".join(filter(None, (self.prefix, validate_job_id(job_id)))) + "/"

    def put(self, job_id: str, name: str, source: Path, *, sha256: str) -> None:
        """Upload ``source``; an object appears whole or not at all (S3 PUT semantics)."""
        key = self.key(job_id, name)
        extra = {"Metadata": {"sha256": sha256}}
        with _translated(job_id, name):
            try:
                self.client.upload_file(str(source), self.bucket, key, ExtraArgs=extra)
            except Exception as exc:
                if _error_code(exc) != "NoSuchBucket":
                    raise
                self.client.create_bucket(Bucket=self.bucket)
                self.client.upload_file(str(source), self.bucket, key, ExtraArgs=extra)

    @contextmanager
    def open(self, job_id: str, name: str) -> Iterator[BinaryIO]:
        """The object's body, streamed (nothing is read before the first ``read``)."""
        with _translated(job_id, name):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name))["Body"]
        try:
            yield cast(BinaryIO, _TranslatedStream(body, job_id, name))
        finally:
            body.close()

    def fetch(self, job_id: str, name: str, dest: Path) -> Path:
        """Download the object to ``dest``."""
        with self.open(job_id, name) as src, atomic_writer(dest) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return dest

    def list(self, job_id: str) -> list[str]:
        """Names of the job's objects."""
        prefix = self._job_prefix(job_id)
        names: list[str] = []
        with _translated(job_id, ""):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                names += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
        return sorted(names)

    def delete_job(self, job_id: str) -> None:
        """Delete every object of the job."""
        keys = [self.key(job_id, name) for name in self.list(job_id)]
        with _translated(job_id, ""):
            for start in range(0, len(keys), 1000):
                chunk = [{"Key": key} for key in keys[start : start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})


def _s3_client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    # Bounded waits and botocore's standard retries (with backoff): a store outage is a
    # clear error within seconds, a blip is retried without the caller noticing.
    config = Config(
        connect_timeout=3,
        read_timeout=30,
        retries={"max_attempts": 4, "mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


@contextmanager
def _translated(job_id: str, name: str) -> Iterator[None]:
    """botocore's errors as the store's own: missing → ArtifactNotFound, else unavailable."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        if _error_code(exc) in ("NoSuchKey", "404", "NotFound"):
            raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}") from exc
        raise StoreUnavailable(f"artifact store: {exc}") from exc
    except (BotoCoreError, S3UploadFailedError, OSError) as exc:
        raise StoreUnavailable(f"artifact store unreachable: {exc}") from exc


class _TranslatedStream:
    """A read-only stream whose read errors are StoreUnavailable (a connection lost mid-way)."""

    def __init__(self, body: Any, job_id: str, name: str) -> None:
        self.body, self.job_id, self.name = body, job_id, name

    def read(self, size: int = -1) -> bytes:
        with _translated(self.job_id, self.name):
            return bytes(self.body.read(None if size < 0 else size))

    def close(self) -> None:
        self.body.close()


def store_from_url(url: str, *, endpoint_url: str | None = None) -> ArtifactStore:
    """The store a URL names: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"artifact URL {url!r} names no bucket (s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "":
        return LocalStore(Path(url))
    raise ValueError(f"artifact URL {url!r}: use s3://bucket/prefix, file:///path or a path")


def make_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name (``artifact_url``, else ``artifact_dir``)."""
    if settings.artifact_url:
        return store_from_url(settings.artifact_url, endpoint_url=settings.s3_endpoint_url)
    return LocalStore(settings.artifact_dir)
