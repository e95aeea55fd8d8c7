"""Decoding an uploaded PNG or JPEG into the one band of ink a digit is read from, safely.

Uploaded bytes are hostile until decoded. Every accepted format is refused before its pixels
are decoded when its header promises too many pixels or too many decoded bytes, and a JPEG
also when it has more scans than any real one (a progressive JPEG of thousands of tiny scans
re-walks the whole image once per scan: 0.5 MB kept a CPU busy for 20 s). The decode itself
runs in a child process with a hard CPU-time and memory limit and a wall-clock timeout, so
whatever slips past the checks costs at most a couple of seconds and never the API process.

Nothing here imports torch: the child starts in a fraction of a second.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096
MAX_DECODED_BYTES = 64 * 1024 * 1024  # what the decoded image may occupy in memory
# Encoders write 2 (baseline) to about 12 (progressive, colour) scans; libjpeg-turbo's own
# tools suggest refusing more than a few hundred. Each scan may cost a pass over the image.
MAX_JPEG_SCANS = 100
CPU_SECONDS = 2  # CPU time the decoding child may use before the kernel stops it
WALL_SECONDS = 4.0  # and wall-clock time, waiting for a busy CPU included
MEMORY_BYTES = 1024 * 1024 * 1024  # the child's address space

InkKind = Literal["alpha", "gray"]


class InvalidImage(ValueError):
    """The bytes are not a usable PNG or JPEG image of a digit."""


class UnsupportedImageFormat(InvalidImage):
    """A readable image, but neither PNG nor JPEG."""


class ImageTooLarge(InvalidImage):
    """Too many pixels, decoded bytes or JPEG scans, or too long to decode: a decoder bomb."""


class DecoderUnavailable(RuntimeError):
    """The decoding child could not be started or failed on its own (not the image's fault)."""


@dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """What decoding one image may cost."""

    max_pixels: int = MAX_PIXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_jpeg_scans: int = MAX_JPEG_SCANS
    cpu_seconds: int = CPU_SECONDS
    wall_seconds: float = WALL_SECONDS
    memory_bytes: int = MEMORY_BYTES


DEFAULT_LIMITS = DecodeLimits()


@dataclass(frozen=True)
class Ink:
    """One 8-bit band of a decoded image: its alpha (a drawing on a transparent canvas) or
    its gray levels, row by row, after the EXIF rotation."""

    kind: InkKind
    width: int
    height: int
    data: bytes


# --- the checks and the decode (run in the child) ---------------------------------------


def decode(image_bytes: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Ink:
    """Check the header, then decode to one band of ink; InvalidImage and subclasses otherwise.

    In this process: callers with untrusted bytes use ``decode_isolated``.
    """
    image = _open(image_bytes, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return _ink(ImageOps.exif_transpose(image))  # a photo's rotation lives in EXIF
    except MemoryError as exc:
        raise ImageTooLarge("the image needs too much memory to decode") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"the image is damaged or truncated: {exc}") from exc


def _ink(image: Image.Image) -> Ink:
    """The band the ink is in: the strokes' opacity on a transparent canvas, else the grays."""
    if _has_transparency(image):
        alpha = image.convert("RGBA").getchannel("A")
        return Ink("alpha", alpha.width, alpha.height, alpha.tobytes())
    gray = image.convert("L")
    return Ink("gray", gray.width, gray.height, gray.tobytes())


def _open(image_bytes: bytes, limits: DecodeLimits) -> Image.Image:
    """The opened (header-read, not decoded) image, if every limit allows decoding it."""
    if not image_bytes:
        raise InvalidImage("the image is empty")
    _check_jpeg_scans(image_bytes, limits.max_jpeg_scans)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes), formats=None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"the image is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage("the data is not a PNG or JPEG image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"the image is damaged or truncated: {exc}") from exc
    if image.format not in FORMATS:
        raise UnsupportedImageFormat(f"a {image.format} image; send PNG or JPEG")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} pixels; at most {limits.max_pixels} pixels"
        )
    needed = width * height * _bytes_per_pixel(image.mode)
    if needed > limits.max_decoded_bytes:
        raise ImageTooLarge(
            f"the image would take {needed} bytes decoded; at most {limits.max_decoded_bytes}"
        )
    return image


def _bytes_per_pixel(mode: str) -> int:
    """Bytes one pixel of ``mode`` takes in Pillow's memory (multi-band modes pad to 4)."""
    if mode.startswith("I;16"):
        return 2
    if mode in ("I", "F") or Image.getmodebands(mode) > 1:
        return 4
    return 1


def _has_transparency(image: Image.Image) -> bool:
    """True if the image has an alpha channel (or transparent palette entry) that varies."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return False
    low, high = image.convert("RGBA").getchannel("A").getextrema()
    return bool(low != high)


# A marker after entropy-coded data: 0xFF (with any fill bytes) not followed by a stuffed 0x00
# or a restart marker RST0-RST7.
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
SOI, EOI, SOS = 0xD8, 0xD9, 0xDA


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans (SOS segments) a JPEG has, counting no further than ``stop_after`` + 1.

    A walk over the segments by their lengths; anything malformed ends the walk, and the
    decoder (still under the child's limits) judges the rest.
    """
    if data[:2] != b"\xff\xd8":
        return 0
    scans, i = 0, 2
    while scans <= stop_after and i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
            continue
        if marker == EOI:
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == SOS:
            scans += 1
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                break
            end = found.end() - 2
        i = end
    return scans


def _check_jpeg_scans(data: bytes, limit: int) -> None:
    scans = jpeg_scans(data, stop_after=limit)
    if scans > limit:
        raise ImageTooLarge(f"the JPEG has more than {limit} scans (a decoder bomb)")


# --- the child processes -----------------------------------------------------------------

_ERRORS: dict[str, type[InvalidImage]] = {
    "too_large": ImageTooLarge,
    "unsupported": UnsupportedImageFormat,
    "invalid": InvalidImage,
}
# A child decodes at most this many images, each under its own CPU limit, then is replaced:
# starting one costs more than most decodes, so it is not started per image.
IMAGES_PER_CHILD = 50
IDLE_CHILDREN = 2  # kept per process, for requests that arrive together


class _ChildDied(Exception):
    """The child ended before answering; its exit status says why."""


class _Child:
    """One decoding process: frames in (8-byte length, image), answers out (JSON line, band)."""

    def __init__(self, limits: DecodeLimits) -> None:
        command = [sys.executable, "-m", __name__, json.dumps(asdict(limits))]
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise DecoderUnavailable(f"cannot start the image decoder: {exc}") from exc
        self.served = 0

    def ask(self, image_bytes: bytes, deadline: float) -> tuple[dict[str, Any], bytes]:
        """Send one image; the answer's header and band. TimeoutError past ``deadline``."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        self.served += 1
        try:
            stdin.write(len(image_bytes).to_bytes(8, "big") + image_bytes)
            stdin.flush()
        except OSError as exc:  # it died before reading
            raise _ChildDied from exc
        return _receive(stdout.fileno(), deadline)

    def stop(self) -> int:
        """Kill the child and reap it; its exit status (negative: the signal that ended it)."""
        self.process.kill()
        self.process.communicate()
        return self.process.returncode


def _receive(fd: int, deadline: float) -> tuple[dict[str, Any], bytes]:
    """Read a JSON header line and the ``size`` bytes it announces, by ``deadline``."""
    buffer, header = b"", None
    while True:
        if header is None and b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            header = json.loads(line)
        if header is not None and len(buffer) >= header.get("size", 0):
            return header, buffer
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise _ChildDied
        buffer += chunk


class IsolatedDecoder:
    """Decodes images in child processes under hard limits: the API's way to read an upload.

    A child that refused an image, ran out of time or memory, or served IMAGES_PER_CHILD
    images is replaced; so a bomb costs its own child and never this process.
    """

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._idle: list[_Child] = []
        self._lock = threading.Lock()

    def decode(self, image_bytes: bytes) -> Ink:
        """The band of ink of ``image_bytes``, decoded in a child.

        InvalidImage and its subclasses for the image's faults (ImageTooLarge when the child
        ran out of time or memory); DecoderUnavailable when the child itself could not run.
        """
        if not image_bytes:
            raise InvalidImage("the image is empty")
        child = self._take()
        try:
            header, data = child.ask(image_bytes, time.monotonic() + self.limits.wall_seconds)
        except TimeoutError as exc:
            child.stop()
            raise ImageTooLarge(
                f"the image takes more than {self.limits.wall_seconds:g} s to decode "
                "(a decoder bomb, or a very busy server)"
            ) from exc
        except _ChildDied as exc:
            status = child.stop()
            if status < 0:  # SIGXCPU at its CPU limit, or SIGKILL (out of memory)
                raise ImageTooLarge(
                    f"the image needs more than {self.limits.cpu_seconds} s of CPU or "
                    f"{self.limits.memory_bytes // 2**20} MiB to decode (a decoder bomb)"
                ) from exc
            raise DecoderUnavailable(f"the image decoder ended with status {status}") from exc
        if "error" in header:
            child.stop()
            raise _ERRORS[header["error"]](header["message"])
        self._give_back(child)
        return Ink(header["kind"], header["width"], header["height"], data)

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.poll() is None:
                    return child
        return _Child(self.limits)

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            if child.served < IMAGES_PER_CHILD and len(self._idle) < IDLE_CHILDREN:
                self._idle.append(child)
                return
        child.stop()


def decode_isolated(image_bytes: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Ink:
    """``decode`` in a child process under ``limits`` (one IsolatedDecoder per limits)."""
    return _decoder(limits).decode(image_bytes)


@functools.cache
def _decoder(limits: DecodeLimits) -> IsolatedDecoder:
    return IsolatedDecoder(limits)


def _answer(out: BinaryIO, header: dict[str, object], data: bytes = b"") -> None:
    out.write(json.dumps(header | {"size": len(data)}).encode() + b"\n" + data)
    out.flush()


def _allow_cpu_seconds(seconds: int) -> None:
    """The kernel ends this process (SIGXCPU) once it has used ``seconds`` more CPU time."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = math.ceil(usage.ru_utime + usage.ru_stime)
    resource.setrlimit(resource.RLIMIT_CPU, (used + seconds, resource.RLIM_INFINITY))


def main() -> None:
    """A child: limits from argv; frames of (8-byte length, image) on stdin until it closes."""
    import resource

    limits = DecodeLimits(**json.loads(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    while len(size := stdin.read(8)) == 8:
        image_bytes = stdin.read(int.from_bytes(size, "big"))
        _allow_cpu_seconds(limits.cpu_seconds)
        try:
            ink = decode(image_bytes, limits)
        except InvalidImage as exc:
            kind = next(k for k, cls in _ERRORS.items() if isinstance(exc, cls))
            _answer(out, {"error": kind, "message": str(exc)})
            continue
        _answer(out, {"kind": ink.kind, "width": ink.width, "height": ink.height}, ink.data)


if __name__ == "__main__":
    main()
