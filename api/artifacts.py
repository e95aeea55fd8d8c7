"""Routes of a job's artifacts: the list and the download of one file."""

from __future__ import annotations

from pathlib import PurePosixPath

from flask import Blueprint, send_file
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
    """The file itself, as an attachment, with its length and an ETag of its sha256."""
    validate_name(name)
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    artifact = get_artifact(session, job.id, name)
    path = services().store.open_existing(job.id, artifact.name)
    return send_file(
        path,
        mimetype=content_type(name),
        as_attachment=True,
        download_name=PurePosixPath(name).name,
        etag=artifact.sha256,
        conditional=True,
    )
