"""Response headers that keep browsers safe, and CORS only for the origins configured."""

from __future__ import annotations

from flask import Flask, Response, request
from flask_cors import CORS

from shared.config import Settings

# The docs page is one HTML document with inline styles: no scripts, frames, forms or
# fetches, so the policy can forbid all of them.
HTML_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# Dashboard pages load their own scripts, styles and plots and fetch the JSON API; nothing
# inline, nothing from elsewhere; forms post only back to the dashboard.
DASHBOARD_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Downloads (plots may be SVG) open in a sandbox that runs nothing, were a browser to render one.
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'; sandbox"


def security_headers(response: Response) -> Response:
    """nosniff, no framing and no referrer on every response; a strict CSP on every page."""
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    policy = OTHER_POLICY
    if response.mimetype == "text/html":
        policy = DASHBOARD_POLICY if request.blueprint == "dashboard" else HTML_POLICY
    headers.setdefault("Content-Security-Policy", policy)
    return response


def init_app(app: Flask, settings: Settings) -> None:
    """Add the headers to every response; answer CORS only when origins are configured."""
    app.after_request(security_headers)
    origins = settings.cors_origin_list
    if origins:
        CORS(
            app,
            resources={r"/api/*": {}, "/openapi.json": {}},
            origins=origins,
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
