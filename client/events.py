"""Server-sent events as the client reads them: the wire format parsed into typed events."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerEvent:
    """One event of a stream: its id, its type (status, progress, metric, log, end), its data."""

    id: int | None
    event: str
    data: dict[str, Any]


def parse(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Events from the lines of a ``text/event-stream`` body (comments and retry skipped)."""
    event_id: int | None = None
    kind, data = "message", list[str]()
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event_id, kind, _json(data))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id" and value.isdigit():
            event_id = int(value)
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)


def _json(data: list[str]) -> dict[str, Any]:
    try:
        parsed = json.loads("\n".join(data))
    except ValueError:
        return {"text": "\n".join(data)}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Lines of a body that arrives in chunks of any size, each as soon as it is complete."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")
