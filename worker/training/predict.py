"""Classify one image of a digit with a trained model: MNIST-style preprocessing and inference.

Preprocessing follows how MNIST itself was made: the digit is cropped to its bounding box,
scaled so its longer side is 20 px (aspect kept) and pasted into a 28x28 field so that its
centre of mass lies at the centre, bright ink on a dark background.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from worker.training.data import MEAN, STD
from worker.training.nets import build_model

FIELD = 28  # MNIST images are 28x28
BOX = 20  # the digit's longer side inside the field
FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # above this an image is refused before it is decoded
# Pixels darker than this fraction of the brightest ink are background for the bounding box:
# it ignores JPEG noise and faint smudges but keeps MNIST's anti-aliased edges.
INK_THRESHOLD = 0.15


class InvalidImage(ValueError):
    """The bytes are not a usable PNG or JPEG image of a digit."""


class UnsupportedImageFormat(InvalidImage):
    """A readable image, but neither PNG nor JPEG."""


class ImageTooLarge(InvalidImage):
    """More pixels than ``MAX_PIXELS`` (a decompression bomb, or simply too big)."""


class ModelUnreadable(Exception):
    """A model file that cannot be loaded into the network it claims to be."""


def preprocess(image_bytes: bytes, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A PNG or JPEG of one digit → the normalized (1, 1, 28, 28) tensor a model expects."""
    ink = _ink(_open(image_bytes, max_pixels))  # (H, W) float32, 0 = background, 1 = ink
    digit = _crop_to_ink(ink)
    field = _centre_in_field(_scale_to_box(digit))  # (28, 28) in 0..1
    return field.sub(MEAN).div(STD).reshape(1, 1, FIELD, FIELD)


def _open(image_bytes: bytes, max_pixels: int) -> Image.Image:
    """Decode the image, refusing other formats and oversized ones before decoding pixels."""
    if not image_bytes:
        raise InvalidImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes), formats=None)
            if image.format not in FORMATS:
                raise UnsupportedImageFormat(f"a {image.format} image; send PNG or JPEG")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"the image is {width}x{height} pixels; at most {max_pixels} pixels"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("the data is not a PNG or JPEG image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InvalidImage):
            raise
        raise InvalidImage(f"the image is damaged or truncated: {exc}") from exc
    return image


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """An 8-bit single-band image as a (H, W) float32 tensor in 0..1."""
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return raw.reshape(image.height, image.width).to(torch.float32).div(255)


def _ink(image: Image.Image) -> torch.Tensor:
    """How much ink each pixel holds, 0..1: bright on dark whatever the image's polarity."""
    image = ImageOps.exif_transpose(image)  # a phone photo's rotation lives in EXIF
    if _has_transparency(image):
        # A drawing on a transparent canvas: the strokes are where it is opaque.
        return _to_tensor(image.convert("RGBA").getchannel("A"))
    gray = _to_tensor(image.convert("L"))
    background = _border_level(gray)
    if background > 0.5:  # dark ink on a light background (paper): invert to MNIST's polarity
        gray, background = 1.0 - gray, 1.0 - background
    ink = (gray - background).clamp_(min=0)
    peak = float(ink.max())
    return ink / peak if peak > 0 else ink


def _has_transparency(image: Image.Image) -> bool:
    """True if the image has an alpha channel (or transparent palette entry) that varies."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return False
    low, high = image.convert("RGBA").getchannel("A").getextrema()
    return bool(low != high)


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
