"""Conditional GETs: an ETag on each JSON answer, and 304 Not Modified while it still holds."""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request

IF_NONE_MATCH = {
    "If-None-Match": "the ETag of an earlier answer: 304 with no body while it is unchanged"
}
NOT_MODIFIED: tuple[str, ...] = ()  # an answer without a body


def conditional_json(body: dict[str, Any]) -> Response:
    """``body`` as JSON with a strong ETag of its bytes; 304 when If-None-Match has it."""
    # The tag is a hash of exactly what would be sent, so it changes whenever anything in
    # the answer does (progress, queue position, an artifact) and never otherwise. A poller
    # still costs the server its queries, but not the transfer or the client's parsing.
    response = jsonify(body)
    response.add_etag()
    return _conditional(response)


def conditional_bytes(body: bytes, etag: str) -> Response:
    """A JSON answer made earlier (``body``, whose ETag is ``etag``), conditionally."""
    response = Response(body, mimetype="application/json")
    response.set_etag(etag)
    return _conditional(response)


def _conditional(response: Response) -> Response:
    # Per caller (the token decides what is visible); caches must ask before reusing it.
    response.headers["Cache-Control"] = "private, no-cache"
    response.vary.add("Authorization")
    response.make_conditional(request)  # in place: 304 and no body on a match
    return response
