"""The dashboard's sweep pages: the list, a sweep with its trials, buttons, cancel."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker

from shared.models import JobStatus
from tests.api.conftest import Caller
from tests.api.test_dashboard import csrf_of, signed_in
from tests.api.test_sweeps import GRID, add_trial


def test_the_sweeps_page_lists_sweeps_with_their_best(
    app: Flask, admin: Caller, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    sweep = client.post("/api/v1/sweeps", json=GRID).get_json()
    add_trial(sessions, sweep["id"], 0, JobStatus.SUCCEEDED, test_accuracy=0.9612)
    page = signed_in(app, admin).get("/ui/sweeps").get_data(as_text=True)
    assert f'href="/ui/sweeps/{sweep["id"]}"' in page
    assert "lr-momentum" in page and "0.9612" in page and "1/4" in page


def test_a_sweep_page_shows_trials_charts_and_the_best_models_buttons(
    app: Flask, admin: Caller, client: FlaskClient, sessions: sessionmaker[Session]
) -> None:
    sweep = client.post("/api/v1/sweeps", json=GRID).get_json()
    best = add_trial(sessions, sweep["id"], 0, JobStatus.SUCCEEDED, test_accuracy=0.97)
    other = add_trial(sessions, sweep["id"], 1, JobStatus.SUCCEEDED, test_accuracy=0.95)
    add_trial(sessions, sweep["id"], 2, JobStatus.PRUNED)
    page = signed_in(app, admin).get(f"/ui/sweeps/{sweep['id']}").get_data(as_text=True)
    assert 'data-param="learning_rate"' in page and 'data-param="momentum"' in page
    assert 'data-param="n_epochs"' not in page  # a constant is not charted
    assert f'id="open-best" href="/ui/jobs/{best}"' in page
    assert f"/ui/compare?job={best}&amp;job={other}" in page
    assert f"/ui/draw?job={best}" in page
    assert page.index(best[:12]) < page.index(other[:12])  # best first
    assert 's-pruned">pruned' in page


def test_cancel_from_the_sweep_page_ends_it(app: Flask, admin: Caller, client: FlaskClient) -> None:
    sweep = client.post("/api/v1/sweeps", json=GRID).get_json()
    browser = signed_in(app, admin)
    path = f"/ui/sweeps/{sweep['id']}"
    response = browser.post(f"{path}/cancel", data={"csrf_token": csrf_of(browser, path)})
    assert response.status_code == 302 and response.headers["Location"] == path
    assert client.get(f"/api/v1/sweeps/{sweep['id']}").get_json()["status"] == "cancelled"
    again = browser.get(path).get_data(as_text=True)
    assert 'id="cancel"' not in again


def test_another_users_sweep_page_is_not_found(app: Flask, alice: Caller, bob: Caller) -> None:
    sweep = (
        app.test_client()
        .post("/api/v1/sweeps", json=GRID, headers={"Authorization": f"Bearer {alice.token}"})
        .get_json()
    )
    assert signed_in(app, bob).get(f"/ui/sweeps/{sweep['id']}").status_code == 404
