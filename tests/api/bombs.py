"""Decoder bombs for the tests and bench/decoder_bombs.py: small files that are slow to decode."""

from __future__ import annotations

import io

from PIL import Image

SOS, EOI = 0xDA, 0xD9


def progressive_jpeg(side: int) -> bytes:
    """A flat gray ``side`` x ``side`` progressive JPEG: each of its AC scans is a few bytes."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=90)
    return buffer.getvalue()


def scan_segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan: its SOS header and its entropy-coded data."""
    scans, i = [], 2
    while data[i + 1] != EOI:
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] == SOS:
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
            scans.append((i, end))
        i = end
    return scans


def scan_bomb(side: int, *, size: int | None = None, scans: int | None = None) -> bytes:
    """A progressive JPEG whose smallest scan is repeated until the file is ``size`` bytes
    (or has ``scans`` extra scans): each repeat makes the decoder walk every block again."""
    data = progressive_jpeg(side)
    start, end = min(scan_segments(data), key=lambda s: s[1] - s[0])
    scan = data[start:end]
    repeats = scans if scans is not None else max(0, ((size or 0) - len(data)) // len(scan))
    return data[:-2] + scan * repeats + data[-2:]
