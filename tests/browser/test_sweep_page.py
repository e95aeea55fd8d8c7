"""The sweep pages in a real browser: the list, the live sweep page, the best model's buttons."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.integration.test_worker import Stack

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

SWEEP_TIMEOUT_MS = 120_000
TWO_CELLS: dict[str, Any] = {
    "name": "browser grid",
    "method": "grid",
    "parameters": {"learning_rate": {"values": [0.05, 0.02]}, "n_epochs": {"value": 1}},
    "base": {"hyperparameters": {"log_interval": 5}},
    "budget": {"max_concurrent": 1},
}


def test_a_sweep_is_watched_to_its_end_and_its_best_model_is_one_click_away(
    page: Page, stack: Stack, shots: Path
) -> None:
    response = stack.api.http.post(f"{stack.api.base}/api/v1/sweeps", json=TWO_CELLS, timeout=10)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    page.goto("/ui/signin")
    page.fill("#token", str(stack.api.http.headers["Authorization"]).split(" ", 1)[1])
    page.click("#signin button[type=submit]")
    page.click("nav >> text=Sweeps")
    expect(page.locator(f'#sweeps tr[data-id="{sweep_id}"]')).to_contain_text("browser grid")
    page.click(f'#sweeps tr[data-id="{sweep_id}"] a')
    expect(page.locator("#cancel")).to_be_visible()
    # The page polls while the sweep runs and reloads itself once it has ended.
    expect(page.locator("#open-best")).to_be_visible(timeout=SWEEP_TIMEOUT_MS)
    expect(page.locator("#status .status")).to_have_text("completed")
    expect(page.locator("#trials tbody tr")).to_have_count(2)
    page.wait_for_function(
        "() => document.querySelector('canvas.param-chart').dataset.points === '2'"
    )
    page.wait_for_function("() => document.getElementById('best-loss-chart').dataset.points > 0")
    page.screenshot(path=shots / "sweep.png", full_page=True)
    best = stack.api.get(f"/sweeps/{sweep_id}")["best"]["job_id"]
    page.click("#draw-best")
    expect(page).to_have_url(re.compile(rf"/ui/draw\?job={best}$"))
    page.go_back()
    page.click("#compare-best")
    expect(page.locator("table.compare th[data-id]")).to_have_count(2)
