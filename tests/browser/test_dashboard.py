"""The dashboard in a real browser: sign in, submit, watch a job train, download, draw, compare.

Each test stands alone (pytest -k NAME): the steps share one signed-in tab and one trained
job when they run together, and make their own when run by themselves.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.conftest import Console, open_tab
from tests.integration.test_worker import ACCURATE, Stack

pytestmark = [pytest.mark.integration, pytest.mark.mnist]

TRAIN_TIMEOUT_MS = 60_000
FIRST_PREDICTION_MS = 30_000
PLOTS = ("examples.png", "loss_curve.png", "predictions.png")


def admin_token(stack: Stack) -> str:
    """The token the stack's API client calls with."""
    return str(stack.api.http.headers["Authorization"]).split(" ", 1)[1]


@pytest.fixture
def fresh_page(browser: Browser, stack: Stack, console: Console) -> Iterator[Page]:
    """A tab in a browser context of its own: no session, whatever ran before."""
    with open_tab(browser, stack, console) as tab:
        yield tab


@pytest.fixture(scope="module")
def signed_in(page: Page, stack: Stack) -> Page:
    """The module's tab, signed in with the admin token."""
    page.goto("/ui/signin")
    page.fill("#token", admin_token(stack))
    page.click("#signin button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/$"))
    return page


@pytest.fixture(scope="module")
def job(stack: Stack) -> dict[str, Any]:
    """The id of a succeeded job, once known: the form's step records its own."""
    return {}


@pytest.fixture
def succeeded_job(stack: Stack, job: dict[str, Any]) -> str:
    """A succeeded, accurate job: the one the form submitted, else one submitted now."""
    if "id" not in job:
        body = {"name": "for the browser", "hyperparameters": {"n_epochs": 1, **ACCURATE}}
        done = stack.api.wait_finished(stack.api.submit(body)["id"])
        assert done["status"] == "succeeded", done["error"]
        job["id"] = done["id"]
    return str(job["id"])


def test_sign_in_with_the_admin_token(fresh_page: Page, stack: Stack, shots: Path) -> None:
    page = fresh_page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui/signin"))
    page.fill("#token", "mnq_" + "0" * 43)
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin .error")).to_contain_text("unknown or revoked")
    page.fill("#token", admin_token(stack))
    page.click("#signin button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/$"))
    expect(page.locator("h1")).to_have_text("Jobs")
    page.screenshot(path=shots / "jobs-empty.png", full_page=True)


def test_submit_from_the_form_and_watch_it_succeed(
    signed_in: Page, job: dict[str, Any], shots: Path
) -> None:
    page = signed_in
    page.goto("/ui/jobs/new")
    page.fill("#f-n_epochs", "0")
    page.click("#new-job button[type=submit]")
    expect(page.locator("#error-n_epochs")).to_contain_text("greater than or equal to 1")
    page.screenshot(path=shots / "form-error.png", full_page=True)
    page.fill("#f-name", "from the browser")
    page.fill("#f-n_epochs", "1")
    page.fill("#f-log_interval", "5")
    for name, value in ACCURATE.items():
        field = page.locator(f"#f-{name}")
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(str(value))
        else:
            field.fill(str(value))
    page.click("#new-job button[type=submit]")
    expect(page.locator(".flash.message")).to_contain_text("submitted")
    job["id"] = page.url.rsplit("/", 1)[1]  # the later steps use this job, not another
    # The log comes in live over the job's event stream while it trains.
    log = page.locator("#log")
    expect(log).to_contain_text("Train Epoch: 1 [0/60000 (0%)]", timeout=TRAIN_TIMEOUT_MS)
    expect(log).to_have_attribute("data-mode", "stream")
    expect(page.locator("#status")).to_have_text("succeeded", timeout=TRAIN_TIMEOUT_MS)
    # The page reloads once the job has finished (the server renders its plots); the curves
    # are drawn by the reloaded page's first poll.
    expect(page.locator('#job[data-status="succeeded"]')).to_be_attached()
    expect(log).to_contain_text("succeeded: test loss ")
    assert log.inner_text().startswith("claimed by worker ")
    for canvas in ("#loss-chart", "#accuracy-chart"):
        page.wait_for_function(f"() => document.querySelector('{canvas}').dataset.points > 0")
        assert painted_pixels(page, canvas) > 500, canvas
    for name in PLOTS:
        image = page.locator(f'img[alt="{name}"]')
        image.scroll_into_view_if_needed()
        expect(image).to_be_visible()
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())
    assert float(page.locator("#accuracy").inner_text().rstrip("%")) >= 90
    page.screenshot(path=shots / "job.png", full_page=True)


def painted_pixels(page: Page, selector: str) -> int:
    """How many pixels of a canvas are neither blank nor the white background."""
    script = """c => { const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4)
          if (d[i + 3] > 0 && (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200)) n++;
        return n; }"""
    return int(page.locator(selector).evaluate(script))


def test_the_job_list_shows_it_with_progress_and_accuracy(
    signed_in: Page, succeeded_job: str, shots: Path
) -> None:
    page = signed_in
    page.goto("/ui/")
    row = page.locator(f'tr[data-id="{succeeded_job}"]')
    expect(row.locator(".status")).to_have_text("succeeded")
    assert row.locator("progress").get_attribute("value") in ("1", "1.0")
    expect(row.locator("td.n").first).to_have_text(re.compile(r"^\d+\.\d\d%$"))
    page.screenshot(path=shots / "jobs.png", full_page=True)


def test_download_the_model(
    signed_in: Page, stack: Stack, succeeded_job: str, tmp_path: Path
) -> None:
    page = signed_in
    page.goto(f"/ui/jobs/{succeeded_job}")
    link = page.locator('a[download][href$="/model.pth"]')
    with page.expect_download() as info:
        link.click()
    saved = tmp_path / "model.pth"
    info.value.save_as(saved)
    data = saved.read_bytes()
    listed = {a["name"]: a for a in stack.api.get(f"/jobs/{succeeded_job}/artifacts")["items"]}
    assert len(data) > 0 and len(data) == listed["model.pth"]["size"]
    assert hashlib.sha256(data).hexdigest() == listed["model.pth"]["sha256"]


def test_draw_a_digit_and_see_the_prediction(
    signed_in: Page, succeeded_job: str, shots: Path
) -> None:
    page = signed_in
    page.goto(f"/ui/draw?job={succeeded_job}")
    pad = page.locator("#pad").bounding_box()
    assert pad is not None
    x = pad["x"] + pad["width"] / 2
    page.mouse.move(x, pad["y"] + pad["height"] * 0.15)
    page.mouse.down()
    for step in range(1, 21):  # a vertical stroke: a "1"
        page.mouse.move(x, pad["y"] + pad["height"] * (0.15 + 0.7 * step / 20))
    page.mouse.up()
    page.click("#predict")
    # The first prediction of an API process loads torch and the model: seconds on a busy host.
    expect(page.locator("#digit")).to_have_text(re.compile(r"^\d$"), timeout=FIRST_PREDICTION_MS)
    shown = [float(t.rstrip("%")) for t in page.locator("#probabilities .p").all_inner_texts()]
    assert len(shown) == 10 and abs(sum(shown) - 100) < 1.5
    digit = int(page.locator("#digit").inner_text())
    assert shown.index(max(shown)) == digit
    assert digit == 1
    page.screenshot(path=shots / "draw.png", full_page=True)


def test_compare_page_draws_the_chosen_jobs(
    signed_in: Page, succeeded_job: str, shots: Path
) -> None:
    page = signed_in
    page.goto("/ui/")
    page.check(f'tr[data-id="{succeeded_job}"] input[type=checkbox]')
    page.click("#compare-button")
    expect(page.locator("table.compare th[data-id]")).to_have_count(1)
    page.wait_for_function("() => document.getElementById('loss-chart').dataset.points > 0")
    assert painted_pixels(page, "#loss-chart") > 500
    page.screenshot(path=shots / "compare.png", full_page=True)
