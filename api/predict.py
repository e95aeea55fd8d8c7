"""Prediction from a trained job: which digit its model sees in an uploaded PNG or JPEG."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue
from sqlalchemy.orm import Session

from api.auth import owner_scope
from api.db import get_session
from api.errors import ApiError
from api.extensions import services
from api.openapi import operation
from api.serialize import dump
from shared.jobs import JobConflict, get_artifact, get_job
from shared.models import Job, JobStatus
from shared.schemas import PredictionOut
from shared.store import ArtifactStore

logger = logging.getLogger(__name__)
bp = Blueprint("predict", __name__, url_prefix="/api/v1/jobs")

MODEL_FILE = "model.pth"
IMAGE_TYPES = ("image/png", "image/jpeg")
FORM_FIELD = "image"
CACHE_SIZE = 8  # models of a few recent jobs; each is a few hundred kB
_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY: dict[str, dict[str, Any]] = {
    **{media: _BINARY for media in IMAGE_TYPES},
    "multipart/form-data": {
        "type": "object",
        "properties": {FORM_FIELD: _BINARY},
        "required": [FORM_FIELD],
    },
}


class ModelCache:
    """The last few loaded models by (job id, sha256 of model.pth): a small thread-safe LRU."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.loads = 0
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], load: Callable[[], Any]) -> Any:
        """The cached model for ``key``, loaded with ``load()`` on a miss."""
        # Loading under the lock: two requests for a new model load it once, not twice.
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load()
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


models = ModelCache(CACHE_SIZE)


def image_body() -> bytes:
    """The uploaded image: a raw PNG/JPEG body or the multipart field ``image``; 400/413/415."""
    # Images may be larger than the JSON bodies MAX_CONTENT_LENGTH is sized for.
    request.max_content_length = services().settings.max_image_bytes
    if request.mimetype == "multipart/form-data":
        upload = request.files.get(FORM_FIELD)
        if upload is None:
            raise ApiError(400, "missing_image", f"the form has no file field {FORM_FIELD!r}")
        return upload.read()  # its declared type is not trusted: the bytes say what they are
    if request.mimetype in IMAGE_TYPES:
        return request.get_data(cache=False)
    raise ApiError(
        415,
        "unsupported_media_type",
        "send the image as the body with Content-Type image/png or image/jpeg, "
        f"or as the multipart/form-data file field {FORM_FIELD!r}",
    )


def predict_for_job(
    session: Session, store: ArtifactStore, job: Job, image_bytes: bytes
) -> dict[str, Any]:
    """The PredictionOut JSON of ``job``'s model.pth for an image; the API's errors otherwise.

    JobConflict (409) unless the job succeeded, ArtifactNotFound (404) without a model file,
    ApiError 413/415/422 for a bad image, ApiError 409 for a model that cannot be loaded.
    """
    if job.status != JobStatus.SUCCEEDED:
        raise JobConflict(f"job {job.id} is {job.status}; only a succeeded job can predict")
    artifact = get_artifact(session, job.id, MODEL_FILE)
    ink = _decode(image_bytes)  # in a child process: a bomb is refused without torch loaded
    # torch loads here, on the first prediction, never when the API starts.
    from worker.training import predict as engine

    try:
        tensor = engine.prepare(ink)
    except engine.InvalidImage as exc:  # e.g. a blank page: no digit to read
        raise ApiError(422, "invalid_image", str(exc)) from exc
    model_name = str(job.hyperparameters.get("model", "tutorial_cnn"))
    model = models.get(
        (job.id, artifact.sha256), lambda: _load(engine, store, job.id, artifact.name, model_name)
    )
    digit, probabilities = engine.predict(model, tensor)
    out = PredictionOut(
        job_id=job.id,
        digit=digit,
        probabilities=probabilities,
        model=model_name,
        epoch=job.n_epochs or None,
        sha256=artifact.sha256,
    )
    return dump(out)


def _decode(image_bytes: bytes) -> Any:
    """The image's band of ink, decoded in a child process; each kind of bad image a 4xx."""
    from worker.training import image_decode as images  # Pillow only, no torch

    try:
        return images.decode_isolated(image_bytes)
    except images.ImageTooLarge as exc:
        raise ApiError(413, "image_too_large", str(exc)) from exc
    except images.UnsupportedImageFormat as exc:
        raise ApiError(415, "unsupported_image_format", str(exc)) from exc
    except images.InvalidImage as exc:
        raise ApiError(422, "invalid_image", str(exc)) from exc
    except images.DecoderUnavailable as exc:
        logger.error("image decoder unavailable: %s", exc)
        raise ApiError(503, "decoder_unavailable", "images cannot be decoded right now") from exc


def _load(engine: Any, store: ArtifactStore, job_id: str, name: str, model_name: str) -> Any:
    """The job's model, fetched from the store once per cache miss."""
    with tempfile.TemporaryDirectory(prefix="mnistq-model-") as folder:
        path = store.fetch(job_id, name, Path(folder) / Path(name).name)
        try:
            return engine.load_model(path, model_name)
        except engine.ModelUnreadable as exc:
            logger.warning("model of %s unusable: %s", job_id, exc)
            raise ApiError(
                409, "model_unreadable", f"the job's model cannot be loaded: {exc}"
            ) from exc


@bp.post("/<job_id>/predict")
@operation(
    summary="Classify a digit image with a job's trained model",
    body=IMAGE_BODY,
    responses={200: PredictionOut},
    errors=(400, 404, 409, 413, 415, 422, 503),
)
def predict(job_id: str) -> ResponseReturnValue:
    """The digit a succeeded job's model sees in a PNG or JPEG, with all ten probabilities."""
    session = get_session()
    job = get_job(session, job_id, owner_id=owner_scope())
    return predict_for_job(session, services().store, job, image_body())
