"""Classify one image of a digit with a trained model: MNIST-style preprocessing and inference.

Preprocessing follows how MNIST itself was made: the digit is cropped to its bounding box,
scaled so its longer side is 20 px (aspect kept) and pasted into a 28x28 field so that its
centre of mass lies at the centre, bright ink on a dark background.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from worker.training.data import MEAN, STD
from worker.training.image_decode import (
    DEFAULT_LIMITS,
    DecodeLimits,
    DecoderUnavailable,
    ImageTooLarge,
    Ink,
    InvalidImage,
    UnsupportedImageFormat,
    decode_isolated,
)
from worker.training.nets import build_model

FIELD = 28  # MNIST images are 28x28
BOX = 20  # the digit's longer side inside the field
# Pixels darker than this fraction of the brightest ink are background for the bounding box:
# it ignores JPEG noise and faint smudges but keeps MNIST's anti-aliased edges.
INK_THRESHOLD = 0.15

__all__ = [
    "DecodeLimits",
    "DecoderUnavailable",
    "ImageTooLarge",
    "InvalidImage",
    "ModelUnreadable",
    "UnsupportedImageFormat",
    "load_model",
    "predict",
    "prepare",
    "preprocess",
]


class ModelUnreadable(Exception):
    """A model file that cannot be loaded into the network it claims to be."""


def preprocess(image_bytes: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """An uploaded PNG or JPEG of one digit → the (1, 1, 28, 28) tensor a model expects.

    The bytes are decoded in a child process under ``limits`` (image_decode.decode_isolated).
    """
    return prepare(decode_isolated(image_bytes, limits))


def prepare(ink: Ink) -> torch.Tensor:
    """One decoded band of ink → the normalized (1, 1, 28, 28) tensor a model expects."""
    digit = _crop_to_ink(_ink_levels(ink))  # (H, W) float32, 0 = background, 1 = ink
    field = _centre_in_field(_scale_to_box(digit))  # (28, 28) in 0..1
    return field.sub(MEAN).div(STD).reshape(1, 1, FIELD, FIELD)


def _to_tensor(ink: Ink) -> torch.Tensor:
    """The band as a (H, W) float32 tensor in 0..1."""
    raw = torch.frombuffer(bytearray(ink.data), dtype=torch.uint8)
    return raw.reshape(ink.height, ink.width).to(torch.float32).div(255)


def _ink_levels(ink: Ink) -> torch.Tensor:
    """How much ink each pixel holds, 0..1: bright on dark whatever the image's polarity."""
    if ink.kind == "alpha":  # a drawing on a transparent canvas: the strokes are opaque
        return _to_tensor(ink)
    gray = _to_tensor(ink)
    background = _border_level(gray)
    if background > 0.5:  # dark ink on a light background (paper): invert to MNIST's polarity
        gray, background = 1.0 - gray, 1.0 - background
    ink_levels = (gray - background).clamp_(min=0)
    peak = float(ink_levels.max())
    return ink_levels / peak if peak > 0 else ink_levels


def _border_level(gray: torch.Tensor) -> float:
    """The background's brightness: the median of the outermost rows and columns."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(border.median())


def _crop_to_ink(ink: torch.Tensor) -> torch.Tensor:
    """The smallest rectangle holding every pixel brighter than INK_THRESHOLD."""
    mask = ink > INK_THRESHOLD
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise InvalidImage("the image is blank: no digit found")
    return ink[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def _scale_to_box(digit: torch.Tensor) -> torch.Tensor:
    """Resize so the longer side is BOX pixels, keeping the aspect ratio (anti-aliased)."""
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.frombytes("F", (width, height), digit.contiguous().numpy().tobytes())
    image = image.resize(size, Image.Resampling.LANCZOS)
    scaled = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32)
    return scaled.reshape(size[1], size[0]).clamp(0, 1)


def _centre_in_field(digit: torch.Tensor) -> torch.Tensor:
    """Paste into a 28x28 field so the centre of mass sits at pixel (14, 14), as in MNIST."""
    height, width = digit.shape
    mass = digit.sum()
    ys = torch.arange(height, dtype=torch.float32)
    xs = torch.arange(width, dtype=torch.float32)
    cy = float((digit.sum(dim=1) * ys).sum() / mass) if mass > 0 else (height - 1) / 2
    cx = float((digit.sum(dim=0) * xs).sum() / mass) if mass > 0 else (width - 1) / 2
    # Keep the whole digit inside the field even when its mass sits far off its box centre.
    top = min(max(round(FIELD / 2 - cy), 0), FIELD - height)
    left = min(max(round(FIELD / 2 - cx), 0), FIELD - width)
    field = torch.zeros(FIELD, FIELD)
    field[top : top + height, left : left + width] = digit
    return field


def load_model(path: Path, model_name: str) -> nn.Module:
    """A network of ``model_name`` with the state_dict in ``path`` (model.pth), in eval mode."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(model_name)
        model.load_state_dict(state)
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, pickle.UnpicklingError) as exc:  # fmt: skip
        raise ModelUnreadable(f"cannot load {model_name} from {path.name}: {exc}") from exc
    return model.eval()


def predict(model: nn.Module, tensor: torch.Tensor) -> tuple[int, list[float]]:
    """(most likely digit, the 10 class probabilities) for one (1, 1, 28, 28) input."""
    with torch.no_grad():
        log_probs = model(tensor)  # (1, 10) log-softmax
    probabilities = log_probs.exp().flatten().tolist()
    return int(log_probs.argmax(dim=1).item()), probabilities
