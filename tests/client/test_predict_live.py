"""/predict of a trained job on real MNIST test digits drawn as PNG and JPEG files."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from torchvision.datasets import MNIST

from client.api import ClientError, Conflict, NotFound
from tests.client.conftest import Server, Trained
from worker.training.data import normalize
from worker.training.predict import load_model

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

N_DIGITS = 200
SIDE = 140  # each 28x28 digit drawn 5x larger


def digit_file(pixels: torch.Tensor, *, invert: bool, fmt: str) -> bytes:
    """One MNIST digit as an upscaled image file, white on black or (inverted) black on white."""
    image = Image.frombytes("L", (28, 28), pixels.numpy().tobytes())
    image = image.resize((SIDE, SIDE), Image.Resampling.NEAREST)
    if invert:
        image = ImageOps.invert(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_predictions_from_image_files_match_the_model_on_mnist_tensors(
    server: Server, trained: Trained, mnist_dir: Path, tmp_path: Path
) -> None:
    test_set = MNIST(str(mnist_dir), train=False, download=False)
    raw, labels = test_set.data[:N_DIGITS], test_set.targets[:N_DIGITS]
    # The reference: the job's own model.pth run directly on those digits' MNIST tensors.
    [model_path] = server.client.download(trained.job.id, ["model.pth"], tmp_path)
    model = load_model(model_path, trained.job.hyperparameters["model"])
    with torch.no_grad():
        reference = model(normalize(raw)).argmax(dim=1)
    predicted = []
    for i in range(N_DIGITS):
        # Every other digit black on white; every fourth a JPEG.
        data = digit_file(raw[i], invert=i % 2 == 1, fmt="JPEG" if i % 4 == 3 else "PNG")
        prediction = server.client.predict(trained.job.id, data)
        assert len(prediction.probabilities) == 10
        assert abs(sum(prediction.probabilities) - 1) < 1e-4
        predicted.append(prediction.digit)
    accuracy = (torch.tensor(predicted) == labels).float().mean().item()
    expected = (reference == labels).float().mean().item()
    agreement = (torch.tensor(predicted) == reference).float().mean().item()
    print(f"/predict {accuracy:.3f} vs model on tensors {expected:.3f}; agree {agreement:.3f}")
    assert abs(accuracy - expected) <= 0.01


def test_a_multipart_upload_predicts_as_the_raw_body_does(
    server: Server, trained: Trained, mnist_dir: Path
) -> None:
    digit = MNIST(str(mnist_dir), train=False, download=False).data[0]
    data = digit_file(digit, invert=True, fmt="PNG")
    raw = server.client.predict(trained.job.id, data)
    response = server.api.http.post(
        f"{server.url}/api/v1/jobs/{trained.job.id}/predict",
        files={"image": ("seven.png", data, "application/octet-stream")},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json() == raw.model_dump(mode="json")
    assert raw.digit == 7 and raw.model == "tutorial_cnn" and raw.epoch == 1


def test_predict_refuses_unknown_unfinished_jobs_and_bad_images(
    server: Server, trained: Trained
) -> None:
    with pytest.raises(NotFound):
        server.client.predict("nosuchjob", b"\x89PNG")
    waiting = server.client.submit({"n_epochs": 1, "device": "cuda"})  # no gpu worker: queued
    with pytest.raises(Conflict) as conflict:
        server.client.predict(waiting.id, b"\x89PNG")
    assert "only a succeeded job can predict" in conflict.value.message
    server.client.cancel(waiting.id)
    with pytest.raises(ClientError) as bad:
        server.client.predict(trained.job.id, b"not an image at all")
    assert (bad.value.status, bad.value.code) == (422, "invalid_image")
