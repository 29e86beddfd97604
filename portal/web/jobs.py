"""The jobs pages."""
from __future__ import annotations

import logging
import math
import shlex

from flask import Response, flash, g, redirect, render_template, request, url_for
from markupsafe import Markup

from containers.errors import ContainerError
from portal.logs import stream as logstream
from portal.auth import login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError
from portal.models import Job
from portal.models.common import parse
from portal.models.datasources import DataSourcePublic
from portal.models.jobs import JobCreate
from portal.logs.plot import render_plot_svg
from portal.models.stage_out import PendingStageOut
from portal.services import accounts, datasources, images, jobs, outputs, registries, stage_out
from slurm.errors import SlurmError
from slurm.states import TERMINAL, JobState
import storage
from storage.errors import StorageError
from portal.web.common import owners, bp, by_field

log = logging.getLogger(__name__)


PAGE_SIZE = 50
#: what the state filter offers ("active": queued or running)
FILTER_STATES = ("SUBMITTING", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                 "OUT_OF_MEMORY")
ACTIVE_STATES = (JobState.SUBMITTING, JobState.PENDING, JobState.CONFIGURING, JobState.RUNNING,
                 JobState.COMPLETING, JobState.SUSPENDED, JobState.REQUEUED, JobState.REQUEUE_HOLD)


# -- jobs --------------------------------------------------------------------------------------

def _page_arg() -> int:
    try:
        return max(1, int(request.args.get("page", "1")))
    except ValueError:
        return 1


@bp.get("/")
@bp.get("/jobs")
@login_required
def jobs_list():
    """A page of jobs, newest first: one COUNT and one LIMIT/OFFSET query, whatever the total."""
    page = _page_arg()
    state = request.args.get("state", "").strip().upper()
    if state == "ACTIVE":
        states = list(ACTIVE_STATES)
    elif state:
        try:
            states = [JobState(state)]
        except ValueError:
            flash("unknown state %r; showing all jobs" % state, "error")
            state, states = "", []
    else:
        states = []
    rows, total = jobs.list_jobs(db(), g.user, PAGE_SIZE, (page - 1) * PAGE_SIZE, states)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return render_template("jobs.html", jobs=rows, total=total, page=page, pages=pages, state=state,
                           filter_states=FILTER_STATES, owners=owners(rows) if g.user.is_admin else {})


def _job_form_context() -> dict:
    user = g.user
    ready = images.stored_images(db(), user, ready_only=True)
    prefixes = []
    for rec in datasources.list_sources(db(), user):
        prefixes += [(h.prefix, h.label) for h in storage.location_hints(DataSourcePublic.of(rec))]
    # the service partition's node type is for inference replicas, not training jobs
    training = [t for t in _settings().node_types.values() if t.partition != "infer"]
    return {"node_types": training, "ready_images": ready, "prefixes": prefixes,
            "projects": accounts.projects_of(db(), user),
            "site_images": registries.site_images(_settings()), "recent_images": images.recent_images(db(), user)}


@bp.route("/jobs/new", methods=["GET", "POST"])
@login_required
def new_job():
    """The create-training-job form: "Show script" renders the batch script (nothing is
    submitted); "Submit" stores and submits the job and goes to its page."""
    settings = _settings()
    ctx = _job_form_context()
    if request.method == "GET":
        form = {"time_limit": "01:00:00", "node_type": next(iter(settings.node_types), ""),
                "image": ctx["site_images"][0].ref if ctx["site_images"] else ""}
        if request.args.get("from"):
            form.update(JobCreate.of_job(jobs.get_job(db(), g.user, request.args["from"])).as_form())
        return render_template("job_new.html", form=form, errors={}, top_errors=[], script=None, **ctx)

    # the template decides which of the create model's fields the form has
    fields = [k for k in JobCreate.model_fields if k in request.form]
    form = {k: request.form.get(k, "") for k in fields}
    body = dict(form, image=form.get("image", "").strip() or request.form.get("image_select", "").strip())
    form["image_select"] = request.form.get("image_select", "")
    errors: dict[str, str] = {}
    top: list[str] = []
    script = None
    try:
        create = parse(JobCreate, body)
        if request.form.get("action") == "script":
            script = jobs.render_script(db(), settings, g.user, create)
        else:
            job = jobs.submit_job(db(), settings, _backend(), _box(), g.user, create)
            flash("job submitted as Slurm job %s" % job.slurm_job_id, "info")
            return redirect(url_for("web.job_page", job_id=job.id))
    except ValidationError as e:
        errors, top = by_field(e, fields)
    except (StorageError, SlurmError, ContainerError, PortalError) as e:
        top = [str(e)]
    status = 422 if errors or top else 200
    return render_template("job_new.html", form=form, errors=errors, top_errors=top, script=script, **ctx), status


def _has_log(job: Job) -> bool:
    return bool(job.slurm_job_id and job.job_dir)


def _progress(job: Job) -> tuple[list, str | None]:
    """The job's progress points, or a message saying why they cannot be read now."""
    if not _has_log(job):
        return [], None
    try:
        return logstream.progress(_settings(), db(), job), None
    except (PortalError, ValueError, OSError) as e:
        log.info("job %s: progress unavailable: %s", job.id, e)
        return [], str(e)


@bp.get("/jobs/<job_id>")
@login_required
def job_page(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    req = job.request
    files, files_error = [], None
    if job.job_dir:
        try:
            files = outputs.list_outputs(job.job_dir)
        except OSError as e:
            files_error = str(e)
    node_type = _settings().node_types.get(job.node_type)
    return render_template(
        "job.html", job=job, req=req, owner=accounts.owner_of(db(), job), events=jobs.events_of(db(), job),
        command=shlex.join(req.get("command") or []), node_type=node_type, has_log=_has_log(job),
        # the plot comes from the log over SSH: the page's script fetches it (plot.svg), so a
        # slow or silent log host never holds the page
        plot=Markup(render_plot_svg([], job.name)), files=files, files_error=files_error,
        terminal=" ".join(sorted(s.value for s in TERMINAL)), pending=PendingStageOut.load(job.stage_out_pending),
        stage_out_log=stage_out.LOG_NAME, keep_days=_settings().job_credentials_keep_days)


@bp.get("/jobs/<job_id>/plot.svg")
@login_required
def job_plot(job_id: str):
    """The job's plot alone (the job page refreshes it while the job runs)."""
    job = jobs.get_job(db(), g.user, job_id)
    points, error = _progress(job)
    if error:
        return Response(error, status=503, mimetype="text/plain", headers={"Cache-Control": "no-store"})
    return Response(render_plot_svg(points, job.name), mimetype="image/svg+xml", headers={"Cache-Control": "no-store"})


@bp.post("/jobs/<job_id>/cancel")
@login_required
def job_cancel(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    try:
        jobs.cancel_job(db(), _backend(), g.user, job)
        flash("cancel requested; the state changes once Slurm has ended the job", "info")
    except (PortalError, SlurmError) as e:
        flash("cannot cancel: %s" % e, "error")
    return redirect(url_for("web.job_page", job_id=job.id))


@bp.post("/jobs/<job_id>/stage-out")
@login_required
def job_finish_stage_out(job_id: str):
    """The "Finish stage-out" button: a Slurm job runs `aiportal stage out` as the job's user."""
    job = jobs.get_job(db(), g.user, job_id)
    try:
        job = stage_out.request_finish(db(), _settings(), _backend(), _box(), g.user, job)
        doc = PendingStageOut.load(job.stage_out_pending)
        flash("finishing the stage-out in Slurm job %s; this page shows how it ends"
              % (doc.finish.slurm_job_id if doc and doc.finish else "?"), "info")
    except (PortalError, SlurmError, StorageError) as e:
        flash("cannot finish the stage-out: %s" % e, "error")
    return redirect(url_for("web.job_page", job_id=job.id))


@bp.post("/jobs/<job_id>/resubmit")
@login_required
def job_resubmit(job_id: str):
    old = jobs.get_job(db(), g.user, job_id)
    try:
        job = jobs.resubmit_job(db(), _settings(), _backend(), _box(), g.user, old)
    except (PortalError, SlurmError, StorageError, ContainerError) as e:
        flash("cannot resubmit: %s" % e, "error")
        return redirect(url_for("web.job_page", job_id=old.id))
    flash("resubmitted job %s as this new job" % old.id, "info")
    return redirect(url_for("web.job_page", job_id=job.id))
