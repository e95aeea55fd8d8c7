"""A real stack (gunicorn API, Celery workers, Redis, PostgreSQL) and headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, sync_playwright

from tests.integration.conftest import make_pg_database, pg_url, redis_server
from tests.integration.test_worker import Stack, stack

# The integration tests' fixtures: the API, workers, Redis and PostgreSQL the browser uses.
__all__ = ["make_pg_database", "pg_url", "redis_server", "stack"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless; a missing browser fails (scripts/services installs it)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/services (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Console:
    """JavaScript errors a page reported: console.error messages and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        """Keep console.error output (failed loads and CSP violations land here too)."""
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location}")

    def on_page_error(self, error: Error) -> None:
        """Keep an uncaught exception."""
        self.errors.append(f"pageerror: {error.message}")


@pytest.fixture(scope="module")
def console() -> Console:
    """Every JavaScript error of the module's page."""
    return Console()


@pytest.fixture(scope="module")
def page(browser: Browser, stack: Stack, console: Console) -> Iterator[Page]:
    """One browser tab on the stack's API, kept across the module's steps like a person's."""
    with open_tab(browser, stack, console) as tab:
        yield tab


@contextmanager
def open_tab(browser: Browser, stack: Stack, console: Console) -> Iterator[Page]:
    """A tab in a browser context of its own on the stack's API, its console watched."""
    context = browser.new_context(base_url=stack.api.base, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    tab.on("console", console.on_console)
    tab.on("pageerror", console.on_page_error)
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture(autouse=True)
def no_javascript_errors(console: Console) -> Iterator[None]:
    """Each step ends with no JavaScript error logged on the page."""
    before = len(console.errors)
    yield
    assert console.errors[before:] == []


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Screenshots of each page, kept for a person to look at when a step fails."""
    return tmp_path_factory.mktemp("screenshots")
