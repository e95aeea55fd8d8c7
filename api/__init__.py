"""The mnistq HTTP API: a Flask app factory with one blueprint per resource."""

from __future__ import annotations

from flask import Flask

from api.extensions import Publish, Services
from shared.celery_app import celery_publisher
from shared.config import Settings, get_settings
from shared.store import make_store


def create_app(settings: Settings | None = None, *, publish: Publish | None = None) -> Flask:
    """Build the API for ``settings`` (default: from the environment); tests pass ``publish``."""
    from api import (
        artifacts,
        auth,
        dashboard,
        db,
        docs,
        errors,
        extensions,
        health,
        jobs,
        limits,
        openapi,
        predict,
        security,
        users,
        workers,
    )

    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # "//etc/passwd" must reach the artifact route (and its 400), not redirect as HTML.
    app.url_map.merge_slashes = False
    store = make_store(settings)
    services = Services(settings, publish or celery_publisher(settings), store)
    extensions.init_app(app, services)
    db.init_app(app, settings.database_url)
    errors.init_app(app)
    auth.init_app(app)
    limits.init_app(app, settings)
    security.init_app(app, settings)
    dashboard.init_app(app, settings)
    blueprints = (
        jobs.bp, artifacts.bp, health.bp, users.bp, workers.bp, openapi.bp, docs.bp, predict.bp,
    )  # fmt: skip
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
