"""What create_app gives the app besides the database: settings, the publisher, the store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, current_app

from shared.config import Settings
from shared.store import ArtifactStore

KEY = "mnistq"
Publish = Callable[[str, str], None]  # publish(job_id, queue); raises BrokerUnavailable


@dataclass(frozen=True)
class Services:
    """The collaborators of the views, built once per app."""

    settings: Settings
    publish: Publish
    store: ArtifactStore


def init_app(app: Flask, services: Services) -> None:
    """Attach ``services`` to ``app``."""
    app.extensions[KEY] = services


def services() -> Services:
    """The services of the current app."""
    found: Services = current_app.extensions[KEY]
    return found
