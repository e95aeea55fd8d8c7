"""The mnistq HTTP API: a Flask app factory with one blueprint per resource."""

from __future__ import annotations

from typing import TYPE_CHECKING

# Nothing is imported with the package itself: gunicorn's master loads api.serving (the
# worker class) before its workers monkey-patch the standard library for gevent, and
# sockets, psycopg and Celery must be imported only after that.
if TYPE_CHECKING:
    from flask import Flask

    from api.extensions import Publish
    from shared.config import Settings


def create_app(settings: Settings | None = None, *, publish: Publish | None = None) -> Flask:
    """Build the API for ``settings`` (default: from the environment); tests pass ``publish``."""
    from flask import Flask

    from api import (
        answer_cache,
        artifacts,
        auth,
        dashboard,
        db,
        docs,
        errors,
        events,
        extensions,
        health,
        jobs,
        limits,
        metrics,
        openapi,
        predict,
        security,
        sweeps,
        users,
        webhooks,
        workers,
    )
    from api.extensions import Services
    from shared.celery_app import celery_publisher
    from shared.config import get_settings
    from shared.store import make_store

    settings = settings or get_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # "//etc/passwd" must reach the artifact route (and its 400), not redirect as HTML.
    app.url_map.merge_slashes = False
    store = make_store(settings)
    services = Services(settings, publish or celery_publisher(settings), store)
    extensions.init_app(app, services)
    db.init_app(app, settings.database_url, settings.db_pool_size)
    answer_cache.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    limits.init_app(app, settings)
    security.init_app(app, settings)
    metrics.init_app(app)
    dashboard.init_app(app, settings)
    blueprints = (
        jobs.bp, sweeps.bp, artifacts.bp, events.bp, health.bp, users.bp, workers.bp,
        openapi.bp, docs.bp, predict.bp, metrics.bp, webhooks.bp,
    )  # fmt: skip
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app
