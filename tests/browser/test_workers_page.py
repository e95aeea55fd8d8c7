"""The Workers page in a real browser: the live worker, its queues, and draining it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.integration.test_worker import Stack

pytestmark = [pytest.mark.integration]


def test_the_workers_page_lists_the_live_worker_and_drains_it(
    page: Page, stack: Stack, shots: Path
) -> None:
    extra = stack.extra_worker().start()  # the one to drain; the stack's own worker stays
    try:
        stack.wait_live_workers(2)
        page.goto("/ui/signin")
        page.fill("#token", stack.api.http.headers["Authorization"].split(" ", 1)[1])
        page.click("#signin button[type=submit]")
        expect(page).to_have_url(re.compile(r"/ui/$"))
        page.click("text=Workers")
        expect(page.locator("h1")).to_have_text("Workers")
        assert extra.popen is not None
        # By its node name: the bare pid may also be part of another row's id.
        name = f"mnistq-{extra.popen.pid}@"
        row = page.locator("#workers tr", has_text=name)
        expect(row).to_contain_text("cpu")
        expect(row.locator(".status")).to_have_text("live")
        expect(page.locator("#queues")).to_contain_text("cpu")
        page.screenshot(path=shots / "workers.png", full_page=True)
        row.locator("button", has_text="Drain").click()
        expect(page.locator(".flash")).to_contain_text("takes nothing new")
        assert extra.popen.wait(timeout=60) == 0, extra.tail()  # idle: it exits at once
        page.goto("/ui/workers")
        expect(page.locator("#workers")).not_to_contain_text(name)
    finally:
        extra.kill()
