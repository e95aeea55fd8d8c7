"""/predict and its preprocessing: MNIST-style centring, polarity, and every kind of bad image."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image, ImageDraw
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker
from torchvision.datasets import MNIST
from werkzeug.test import TestResponse

from api import create_app
from api import predict as predict_route
from api.db import ENGINE_KEY
from shared.models import Artifact
from shared.store import LocalStore
from tests.api.bombs import progressive_jpeg, scan_bomb
from tests.api.conftest import (
    Caller,
    add_artifact,
    add_user,
    client_as,
    insert_job,
    make_settings,
)
from worker.training.data import MEAN, STD, normalize
from worker.training.image_decode import (
    DecodeLimits,
    ImageTooLarge,
    IsolatedDecoder,
    decode,
    jpeg_scans,
)
from worker.training.nets import build_model
from worker.training.predict import InvalidImage, prepare, preprocess


def prepared(data: bytes) -> torch.Tensor:
    """What preprocess gives, decoded in this process: the tests of the arithmetic need no
    child process per image (test_the_child_decodes_as_this_process_does says they agree)."""
    return prepare(decode(data))


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def pixels(tensor: torch.Tensor) -> torch.Tensor:
    """A preprocessed (1, 1, 28, 28) tensor back in 0..1 ink."""
    return tensor[0, 0] * STD + MEAN


def centre_of_mass(field: torch.Tensor) -> tuple[float, float]:
    idx = torch.arange(28, dtype=torch.float32)
    mass = field.sum()
    return float((field.sum(1) * idx).sum() / mass), float((field.sum(0) * idx).sum() / mass)


def ink_box(field: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the box holding every inked pixel."""
    rows = torch.nonzero(field.sum(1) > 0.05).flatten()
    cols = torch.nonzero(field.sum(0) > 0.05).flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def stroke(size: tuple[int, int], box: tuple[int, int, int, int], ink: int, paper: int) -> bytes:
    """An L-shaped stroke inside ``box`` on a canvas of ``size``."""
    image = Image.new("L", size, paper)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=ink, width=12)
    return png(image)


def test_an_off_centre_digit_is_cropped_scaled_to_20_px_and_centred_by_mass() -> None:
    data = stroke((400, 300), (20, 30, 120, 250), ink=255, paper=0)
    field = pixels(prepared(data))
    assert max(ink_box(field)) == 20
    cy, cx = centre_of_mass(field)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_a_tall_thin_digit_keeps_its_aspect_ratio() -> None:
    image = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(image).rectangle((95, 10, 104, 189), fill=255)  # 10 x 180
    height, width = ink_box(pixels(prepared(png(image))))
    assert height == 20 and width in (1, 2, 3)


def test_dark_ink_on_paper_is_inverted_to_bright_ink_on_dark() -> None:
    bright = prepared(stroke((140, 140), (30, 20, 110, 120), ink=255, paper=0))
    on_paper = prepared(stroke((140, 140), (30, 20, 110, 120), ink=20, paper=235))
    assert pixels(on_paper)[0, 0] == pytest.approx(0, abs=1e-6)  # background is dark
    assert torch.allclose(bright, on_paper, atol=0.05)


def test_a_drawing_on_a_transparent_canvas_uses_its_strokes() -> None:
    image = Image.new("RGBA", (140, 140), (0, 0, 0, 0))
    ImageDraw.Draw(image).line([(30, 20), (30, 120), (110, 120)], fill=(0, 0, 0, 255), width=12)
    reference = prepared(stroke((140, 140), (30, 20, 110, 120), ink=255, paper=0))
    assert torch.allclose(prepared(png(image)), reference, atol=0.05)


def test_real_mnist_digits_come_back_as_they_were(mnist_dir: Path) -> None:
    digits = MNIST(str(mnist_dir), train=False, download=False).data[:50]
    for i, digit in enumerate(digits):
        image = Image.frombytes("L", (28, 28), digit.numpy().tobytes()).resize((140, 140))
        got = prepared(png(image))
        # Bilinear upscaling blurs the edges a little; the digit keeps its place and shape.
        assert (got - normalize(digit[None])).abs().mean() < 0.2, i
        assert got.shape == (1, 1, 28, 28)


# --- the route ---------------------------------------------------------------------------


def model_bytes(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(build_model("tutorial_cnn").state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture
def trained_job(sessions: sessionmaker[Session], store: LocalStore, admin: Caller) -> str:
    """A succeeded job of the admin's with an (untrained) model.pth."""
    job_id = insert_job(sessions, status="succeeded", n_epochs=2, owner_id=admin.id)
    add_artifact(sessions, store, job_id, "model.pth", model_bytes())
    return job_id


DIGIT = stroke((140, 140), (30, 20, 110, 120), ink=255, paper=0)


def post_image(
    client: FlaskClient, job_id: str, data: bytes, media: str = "image/png"
) -> TestResponse:
    return client.post(f"/api/v1/jobs/{job_id}/predict", data=data, content_type=media)


def test_a_succeeded_job_predicts_from_a_raw_body_or_a_form(
    client: FlaskClient, trained_job: str
) -> None:
    raw = client.post(f"/api/v1/jobs/{trained_job}/predict", data=DIGIT, content_type="image/png")
    assert raw.status_code == 200, raw.get_json()
    body = raw.get_json()
    assert set(body) == {"job_id", "digit", "probabilities", "model", "epoch", "sha256"}
    assert (body["job_id"], body["model"], body["epoch"]) == (trained_job, "tutorial_cnn", 2)
    assert len(body["probabilities"]) == 10 and sum(body["probabilities"]) == pytest.approx(1)
    assert body["digit"] == max(range(10), key=lambda d: body["probabilities"][d])
    form = client.post(
        f"/api/v1/jobs/{trained_job}/predict", data={"image": (io.BytesIO(DIGIT), "d.png")}
    )
    assert form.status_code == 200 and form.get_json() == body


def test_the_model_is_loaded_once_per_job_and_sha256(
    client: FlaskClient, trained_job: str, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    before = predict_route.models.loads
    first = post_image(client, trained_job, DIGIT).get_json()
    post_image(client, trained_job, DIGIT)
    assert predict_route.models.loads == before + 1
    # A new model.pth (new sha256) is loaded afresh.
    with sessions() as session, session.begin():
        session.execute(delete(Artifact).where(Artifact.job_id == trained_job))
    add_artifact(sessions, store, trained_job, "model.pth", model_bytes(seed=1))
    second = post_image(client, trained_job, DIGIT).get_json()
    assert predict_route.models.loads == before + 2
    assert second["sha256"] != first["sha256"]


@pytest.mark.parametrize(
    ("status", "code"),
    [("queued", 409), ("running", 409), ("failed", 409), ("cancelled", 409)],
)
def test_only_a_succeeded_job_predicts(
    client: FlaskClient, sessions: sessionmaker[Session], status: str, code: int
) -> None:
    job_id = insert_job(sessions, status=status)
    response = post_image(client, job_id, DIGIT)
    assert response.status_code == code
    assert response.get_json()["error"] == "job_state_conflict"


def test_missing_jobs_models_and_other_users_jobs_are_404(
    app: Flask, client: FlaskClient, sessions: sessionmaker[Session], trained_job: str,
    alice: Caller,
) -> None:  # fmt: skip
    without_model = insert_job(sessions, status="succeeded")
    assert post_image(client, without_model, DIGIT).get_json()["error"] == "artifact_not_found"
    assert post_image(client, "nosuchjob", DIGIT).status_code == 404
    assert post_image(client_as(app, alice), trained_job, DIGIT).status_code == 404


def test_an_unreadable_model_is_a_409_not_a_500(
    client: FlaskClient, sessions: sessionmaker[Session], store: LocalStore
) -> None:
    job_id = insert_job(sessions, status="succeeded")
    add_artifact(sessions, store, job_id, "model.pth", b"not a torch file")
    response = post_image(client, job_id, DIGIT)
    assert response.status_code == 409
    assert response.get_json()["error"] == "model_unreadable"


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` pixels, with almost no data."""
    image = Image.new("1", (width, height))
    return png(image)


def gif() -> bytes:
    return png(Image.new("L", (10, 10)), "GIF")


def truncated_png() -> bytes:
    return DIGIT[: len(DIGIT) // 2]


def blank() -> bytes:
    return png(Image.new("L", (50, 50), 255))


BAD_IMAGES = [
    ("empty", b"", "image/png", 422, "invalid_image"),
    ("not an image", b"hello, world", "image/png", 422, "invalid_image"),
    ("truncated", truncated_png(), "image/png", 422, "invalid_image"),
    ("blank page", blank(), "image/png", 422, "invalid_image"),
    ("gif", gif(), "image/png", 415, "unsupported_image_format"),
    ("text", b"7", "text/plain", 415, "unsupported_media_type"),
    ("json", b'{"image": "x"}', "application/json", 415, "unsupported_media_type"),
    ("too many pixels", bomb_png(5000, 5000), "image/png", 413, "image_too_large"),
    ("decompression bomb", bomb_png(30000, 30000), "image/png", 413, "image_too_large"),
    ("progressive JPEG bomb", scan_bomb(1024, size=100_000), "image/jpeg", 413, "image_too_large"),
    ("too many pixels as JPEG", progressive_jpeg(4100), "image/jpeg", 413, "image_too_large"),
]


@pytest.mark.parametrize(
    ("data", "media", "status", "code"),
    [case[1:] for case in BAD_IMAGES],
    ids=[case[0] for case in BAD_IMAGES],
)
def test_bad_images_are_4xx_json_naming_the_problem(
    client: FlaskClient, trained_job: str, data: bytes, media: str, status: int, code: str
) -> None:
    response = post_image(client, trained_job, data, media)
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert body["error"] == code and body["message"]


def test_a_form_without_an_image_field_is_400(client: FlaskClient, trained_job: str) -> None:
    form = {"picture": (io.BytesIO(DIGIT), "d.png")}  # multipart, but the field is misnamed
    response = client.post(f"/api/v1/jobs/{trained_job}/predict", data=form)
    assert response.status_code == 400 and response.get_json()["error"] == "missing_image"


def test_images_larger_than_the_limit_are_413(
    tmp_path: Path, database_url: str, sessions: sessionmaker[Session]
) -> None:
    app = create_app(make_settings(tmp_path, database_url, max_image_bytes=1000))
    caller = add_user(sessions, "big")
    job_id = insert_job(sessions, status="succeeded", owner_id=caller.id)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (100 * 100,), dtype=torch.uint8, generator=generator)
    data = png(Image.frombytes("L", (100, 100), noise.numpy().tobytes()))
    assert len(data) > 1000
    response = post_image(client_as(app, caller), job_id, data)
    assert response.status_code == 413
    assert response.get_json()["error"] == "payload_too_large"
    app.extensions[ENGINE_KEY].dispose()


def test_preprocess_raises_invalid_image_for_garbage() -> None:
    with pytest.raises(InvalidImage):
        preprocess(b"\x89PNG\r\n\x1a\n garbage")


def test_the_child_decodes_as_this_process_does() -> None:
    for data in (DIGIT, png(Image.open(io.BytesIO(DIGIT)), "JPEG")):
        assert torch.equal(preprocess(data), prepared(data))


def test_a_normal_progressive_jpeg_is_accepted() -> None:
    image = Image.open(io.BytesIO(DIGIT)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True)
    assert 1 < jpeg_scans(buffer.getvalue(), 1000) <= 12
    assert torch.allclose(preprocess(buffer.getvalue()), prepared(DIGIT), atol=0.05)


def test_a_jpeg_with_too_many_scans_is_refused_before_it_is_decoded() -> None:
    bomb = scan_bomb(256, scans=200)
    assert jpeg_scans(bomb, 1000) > 100
    with pytest.raises(ImageTooLarge, match="more than 100 scans"):
        decode(bomb)


def test_a_bomb_past_every_check_is_stopped_by_the_childs_cpu_limit() -> None:
    """The scan cap lifted: the child's hard CPU limit still ends the decode, not the API."""
    bomb = scan_bomb(4096, scans=3000)  # a few seconds of CPU to decode in full
    # A wall limit far away: the kernel's CPU limit (SIGXCPU) is what stops this child.
    decoder = IsolatedDecoder(DecodeLimits(max_jpeg_scans=10**6, cpu_seconds=1, wall_seconds=60))
    assert decoder.decode(DIGIT) == decode(DIGIT)
    with pytest.raises(ImageTooLarge, match="more than 1 s of CPU"):
        decoder.decode(bomb)
    assert decoder.decode(DIGIT) == decode(DIGIT)  # a fresh child took the killed one's place


def test_a_bomb_past_every_check_is_stopped_by_the_wall_limit_too() -> None:
    bomb = scan_bomb(4096, scans=3000)
    decoder = IsolatedDecoder(DecodeLimits(max_jpeg_scans=10**6, cpu_seconds=60, wall_seconds=0.5))
    with pytest.raises(ImageTooLarge, match=r"takes more than 0\.5 s"):
        decoder.decode(bomb)
    assert decoder.decode(DIGIT) == decode(DIGIT)


def test_decoded_bytes_are_capped_for_every_format() -> None:
    limits = DecodeLimits(max_decoded_bytes=100 * 100 * 4 - 1)
    for image in (Image.new("RGB", (100, 100)), Image.new("L", (200, 200))):
        for fmt in ("PNG", "JPEG"):
            with pytest.raises(ImageTooLarge, match="bytes decoded"):
                decode(png(image, fmt), limits)
    assert decode(png(Image.new("L", (100, 100), 0)), limits).kind == "gray"
