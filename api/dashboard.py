"""The dashboard: server-rendered pages over the job API, signed in with an API token."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from api import dashboard_session
from api.auth import caller, owner_scope, public
from api.dashboard_forms import Submission, form_fields, read_submission
from api.db import get_session
from api.errors import ApiError
from api.extensions import services
from api.jobs import submit_job
from api.limits import check_submit_rate
from api.predict import image_body, predict_for_job
from api.serialize import dump, job_json, jobs_json, sweeps_json, trials_json
from api.workers import queue_out, worker_out
from shared.config import Settings
from shared.jobs import (
    InvalidJobRequest,
    JobConflict,
    TooManyQueuedJobs,
    get_job,
    list_jobs,
    request_cancel,
)
from shared.sweeps import SweepConflict, get_sweep, list_sweeps
from shared.sweeps import request_cancel as request_sweep_cancel
from shared.workers import WorkerNotFound, list_workers, queue_summary, request_drain

bp = Blueprint("dashboard", __name__)

PLOTS = ("examples.png", "loss_curve.png", "predictions.png")
MAX_COMPARED = 8


def init_app(app: Flask, settings: Settings) -> None:
    """Register the dashboard and the session it signs people in with."""
    dashboard_session.init_app(app, settings)
    app.register_blueprint(bp)


@bp.before_request
def _signed_in() -> ResponseReturnValue | None:
    """Check CSRF on every post; every page but sign-in needs a live session."""
    dashboard_session.check_csrf()
    if request.endpoint in ("dashboard.signin", "dashboard.root"):
        return None
    token = dashboard_session.session_token()
    if token is None:
        if request.method == "GET":
            return redirect(url_for("dashboard.signin", next=request.full_path.rstrip("?")))
        raise ApiError(401, "authentication_required", "sign in to the dashboard first")
    g.api_token = token
    return None


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    user = caller().user if "api_token" in g else None
    return {"csrf_token": dashboard_session.csrf_token, "user": user}


@bp.get("/")
@public
def root() -> ResponseReturnValue:
    """The dashboard lives under /ui/."""
    return redirect(url_for("dashboard.jobs"))


@bp.route("/ui/signin", methods=["GET", "POST"])
@public
def signin() -> ResponseReturnValue:
    """Sign in with an API token; the session cookie then stands for it."""
    if request.method == "GET":
        return render_template("dashboard/signin.html", error=None)
    if dashboard_session.sign_in(request.form.get("token", "")) is None:
        # 200, as a re-shown form is: the page is fine, the token is not.
        return render_template("dashboard/signin.html", error="That token is unknown or revoked.")
    return redirect(_local(request.args.get("next")) or url_for("dashboard.jobs"))


def _local(target: str | None) -> str | None:
    """``target`` if it is a path on this site (no open redirect), else None."""
    # Judge the URL a browser will follow: it drops tabs and newlines anywhere ("/\t/evil"
    # becomes "//evil") and reads a backslash as a slash, so any control character or
    # backslash is refused outright; CR/LF would also break the Location header.
    if not target or any(ch < " " or ch in "\x7f\\" for ch in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


@bp.post("/ui/signout")
@public
def signout() -> ResponseReturnValue:
    """End the session."""
    dashboard_session.sign_out()
    return redirect(url_for("dashboard.signin"))


@bp.get("/ui/")
@public
def jobs() -> ResponseReturnValue:
    """The job list, refreshed live by jobs.js."""
    session = get_session()
    page_size = services().settings.page_size
    found, _cursor = list_jobs(session, limit=page_size, owner_id=owner_scope())
    return render_template("dashboard/jobs.html", jobs=jobs_json(session, found), limit=page_size)


@bp.route("/ui/jobs/new", methods=["GET", "POST"])
@public
def new_job() -> ResponseReturnValue:
    """The submit form: every hyperparameter with its default and bounds."""
    if request.method == "GET":
        return _form(Submission({}, None, {}))
    submission = read_submission(request.form)
    if submission.body is None:
        return _form(submission)
    check_submit_rate()
    try:
        job_id = _submit(submission)
    except (InvalidJobRequest, TooManyQueuedJobs) as exc:
        submission.errors[""] = str(exc)
        return _form(submission)
    flash(f"Job {job_id} submitted.")
    return redirect(url_for("dashboard.job", job_id=job_id))


def _form(submission: Submission) -> ResponseReturnValue:
    # Errors re-show the form with 200: the page itself loaded fine.
    return render_template("dashboard/new.html", fields=form_fields(), form=submission)


def _submit(submission: Submission) -> str:
    """Store the job and publish it as POST /api/v1/jobs does; its id."""
    assert submission.body is not None
    job, _created = submit_job(get_session(), submission.body, None)
    return job.id


@bp.get("/ui/jobs/<job_id>")
@public
def job(job_id: str) -> ResponseReturnValue:
    """One job: live curves, plots, hyperparameters, artifacts, cancel."""
    session = get_session()
    found = job_json(session, get_job(session, job_id, owner_id=owner_scope()))
    plots = [a for a in found["artifacts"] if a["name"] in PLOTS]
    return render_template("dashboard/job.html", job=found, plots=plots)


@bp.post("/ui/jobs/<job_id>/cancel")
@public
def cancel(job_id: str) -> ResponseReturnValue:
    """Cancel from the job page, then show it again."""
    try:
        request_cancel(get_session(), job_id, owner_id=owner_scope())
        flash("Cancellation requested.")
    except JobConflict as exc:
        flash(str(exc), "error")
    return redirect(url_for("dashboard.job", job_id=job_id))


@bp.get("/ui/workers")
@public
def workers_page() -> ResponseReturnValue:
    """Workers (hostname, pid, queues, slots, jobs, last seen, state) and queues."""
    session = get_session()
    found = [dump(worker_out(view)) for view in list_workers(session, owner_id=owner_scope())]
    queues = [dump(queue_out(view)) for view in queue_summary(session)]
    return render_template("dashboard/workers.html", workers=found, queues=queues)


@bp.post("/ui/workers/<worker_id>/drain")
@public
def drain_worker(worker_id: str) -> ResponseReturnValue:
    """Drain from the Workers page (admins only), then show it again."""
    if not caller().user.is_admin:
        flash("Only an admin may drain a worker.", "error")
    else:
        try:
            request_drain(get_session(), worker_id)
            flash("The worker finishes what it runs, takes nothing new, then exits.")
        except WorkerNotFound as exc:
            flash(str(exc), "error")
    return redirect(url_for("dashboard.workers_page"))


@bp.get("/ui/compare")
@public
def compare() -> ResponseReturnValue:
    """Selected jobs side by side: final metrics, hyperparameters, overlaid curves."""
    session = get_session()
    ids = list(dict.fromkeys(request.args.getlist("job")))[:MAX_COMPARED]
    chosen = [get_job(session, job_id, owner_id=owner_scope()) for job_id in ids]
    compared = jobs_json(session, chosen)
    keys = [f.name for f in form_fields()]
    return render_template("dashboard/compare.html", jobs=compared, keys=keys)


@bp.get("/ui/draw")
@public
def draw() -> ResponseReturnValue:
    """Draw a digit and see what a succeeded job's model makes of it."""
    session = get_session()
    done, _cursor = list_jobs(
        session, statuses=["succeeded"], limit=services().settings.page_size,
        owner_id=owner_scope(),
    )  # fmt: skip
    chosen = request.args.get("job") or (done[0].id if done else None)
    return render_template("dashboard/draw.html", jobs=done, chosen=chosen)


@bp.post("/ui/jobs/<job_id>/predict")
@public
def predict(job_id: str) -> ResponseReturnValue:
    """The drawn PNG through the job's model: the digit and its ten probabilities."""
    session = get_session()
    found = get_job(session, job_id, owner_id=owner_scope())
    # The API's own reader: its size limit, its 415 for anything but an image.
    return predict_for_job(session, services().store, found, image_body())


@bp.get("/ui/sweeps")
@public
def sweeps() -> ResponseReturnValue:
    """The sweep list: state, trials, best so far."""
    session = get_session()
    found = list_sweeps(session, limit=services().settings.page_size, owner_id=owner_scope())
    return render_template("dashboard/sweeps.html", sweeps=sweeps_json(session, found))


@bp.get("/ui/sweeps/<sweep_id>")
@public
def sweep(sweep_id: str) -> ResponseReturnValue:
    """One sweep: its trials, the metric against each parameter, the best trial's curves."""
    session = get_session()
    row = get_sweep(session, sweep_id, owner_id=owner_scope())
    found, trials = sweeps_json(session, [row])[0], trials_json(session, row)["items"]
    names = [n for n, p in found["parameters"].items() if p.get("distribution") != "constant"]
    top = [t["job"]["id"] for t in trials if t["value"] is not None][:MAX_COMPARED]
    return render_template("dashboard/sweep.html", sweep=found, trials=trials, names=names, top=top)


@bp.post("/ui/sweeps/<sweep_id>/cancel")
@public
def cancel_sweep(sweep_id: str) -> ResponseReturnValue:
    """Cancel from the sweep page, then show it again."""
    try:
        request_sweep_cancel(get_session(), sweep_id, owner_id=owner_scope())
        flash("Sweep cancelled: queued trials now, running ones at their next heartbeat.")
    except SweepConflict as exc:
        flash(str(exc), "error")
    return redirect(url_for("dashboard.sweep", sweep_id=sweep_id))
