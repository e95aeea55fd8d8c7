"""Routes of a job's artifacts: the list and the download of one file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import PurePosixPath
from typing import BinaryIO

from flask import Blueprint, Response, request
from flask.typing import ResponseReturnValue

from api.auth import owner_scope
from api.db import get_session
from api.extensions import services
from api.openapi import operation
from api.serialize import artifact_out, dump
from shared.artifacts import validate_name
from shared.jobs import artifacts_of, get_artifact, get_job
from shared.schemas import ArtifactListOut

bp = Blueprint("artifacts", __name__, url_prefix="/api/v1/jobs/<job_id>/artifacts")

CHUNK_BYTES = 256 * 1024
CONTENT_TYPES = {
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
}


# For the OpenAPI document: every media type a download may have, without parameters.
DOWNLOAD_MEDIA_TYPES = (
    *sorted({media.split(";")[0] for media in CONTENT_TYPES.values()}),
    "application/octet-stream",
)


def content_type(name: str) -> str:
    """The media type an artifact is served as; checkpoints and models are opaque bytes."""
    return CONTENT_TYPES.get(PurePosixPath(name).suffix.lower(), "application/octet-stream")


@bp.get("")
@operation(summary="List a job's artifacts", responses={200: ArtifactListOut}, errors=(404, 503))
def index(job_id: str) -> ResponseReturnValue:
    """Name, kind, size, sha256 and download URL of each file the job produced."""
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    items = [artifact_out(a) for a in artifacts_of(session, [job.id])[job.id]]
    return dump(ArtifactListOut(job_id=job.id, items=items))


@bp.get("/<path:name>")
@operation(
    summary="Download an artifact",
    responses={200: DOWNLOAD_MEDIA_TYPES},
    errors=(400, 404, 503),
)
def download(job_id: str, name: str) -> ResponseReturnValue:
    """The file itself, streamed from the artifact store, with its length and sha256 ETag."""
    validate_name(name)
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    artifact = get_artifact(session, job.id, name)
    response = Response(status=200, mimetype=content_type(name))
    response.set_etag(artifact.sha256)
    response.headers["Content-Disposition"] = f"attachment; filename={PurePosixPath(name).name}"
    response.make_conditional(request)
    if response.status_code == 304:
        return response
    # Opened before the first byte is sent, so a missing object or a store outage is still
    # a JSON 404 or 503 rather than a broken download.
    opened = services().store.open(job.id, artifact.name)
    stream = opened.__enter__()
    response.response = _chunks(stream, opened)
    response.content_length = artifact.size
    return response


def _chunks(stream: BinaryIO, opened: AbstractContextManager[BinaryIO]) -> Iterator[bytes]:
    """The object's bytes in chunks; the stream is closed however the download ends."""
    try:
        while chunk := stream.read(CHUNK_BYTES):
            yield chunk
    finally:
        opened.__exit__(None, None, None)
