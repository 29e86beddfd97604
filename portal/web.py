"""Server-rendered pages (Flask + Jinja; no JS build step, a few lines of inline vanilla JS).

Every page is behind :func:`portal.auth.login_required` (which also checks the CSRF token of
every POST). Users see their own jobs, images, data sources and tokens; admins see every job.
The pages call the same service layer as the JSON API; what a form got wrong is shown next to
its field, with the user's input kept.

| page | route |
| --- | --- |
| jobs (paged, filter by state) | ``GET /`` and ``GET /jobs?page=N&state=S`` |
| new job (show script / submit) | ``GET|POST /jobs/new`` (``?from=JOB`` fills it from a job) |
| job (timeline, log, plot, outputs) | ``GET /jobs/ID``, ``GET /jobs/ID/plot.svg``, ``POST /jobs/ID/cancel|resubmit`` |
| cluster (admins: drain/resume) | ``GET /cluster``, ``POST /cluster/nodes/NODE/drain|resume`` |
| images | ``GET|POST /images`` |
| data sources (browse a prefix) | ``GET /data?source=NAME&prefix=s3://...``, ``POST /data``, ``POST /data/NAME/delete`` |
| API tokens | ``GET|POST /tokens``, ``POST /tokens/ID/revoke`` |
| inference services (deploy, scale, update, delete) | ``GET|POST /services``, ``POST /services/NAME/scale|update|delete`` |
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shlex

from flask import Blueprint, Response, flash, g, redirect, render_template, request, url_for
from markupsafe import Markup
from sqlmodel import select
from werkzeug.exceptions import HTTPException

from containers.errors import ContainerError
from portal import logstream
from portal.app import error_status
from portal.auth import admin_required, login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError
from portal.models import Event, Image, ImageState, Job, User
from portal.plot import render_plot_svg
from portal.services import accounts, datasources, images, inference, jobs, nodes, outputs
from slurm.errors import SlurmError
from slurm.states import TERMINAL, JobState
from storage.errors import StorageError

log = logging.getLogger(__name__)

bp = Blueprint("web", __name__)

PAGE_SIZE = 50
#: the new-job form's fields, in the order of the form (errors of other fields go on top)
JOB_FIELDS = ("name", "image", "node_type", "inputs", "output", "command", "env", "time_limit", "sweep", "project")
#: what the state filter offers ("active": queued or running)
FILTER_STATES = ("SUBMITTING", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                 "OUT_OF_MEMORY")
ACTIVE_STATES = (JobState.SUBMITTING, JobState.PENDING, JobState.CONFIGURING, JobState.RUNNING,
                 JobState.COMPLETING, JobState.SUSPENDED, JobState.REQUEUED, JobState.REQUEUE_HOLD)
# a state's colour on the pages, by group
_STATE_GROUP = {JobState.COMPLETED: "ok", JobState.RUNNING: "run", JobState.CONFIGURING: "run",
                JobState.COMPLETING: "run", JobState.CANCELLED: "off", JobState.SUBMITTING: "wait",
                JobState.PENDING: "wait", JobState.REQUEUED: "wait", JobState.REQUEUE_HOLD: "wait",
                JobState.SUSPENDED: "wait", JobState.UNKNOWN: "off"}


# -- template helpers and error pages ----------------------------------------------------------

@bp.app_template_global()
def state_class(state) -> str:
    """CSS class of a job state (JobState or its value): ok, run, wait, off or bad."""
    if not isinstance(state, JobState):
        try:
            state = JobState(str(state))
        except ValueError:
            return "state off"
    return "state " + _STATE_GROUP.get(state, "bad" if state.terminal else "wait")


@bp.app_template_filter("when")
def when(t: dt.datetime | float | None) -> str:
    """A time (aware or naive-UTC datetime, or a Unix timestamp) as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    if t is None:
        return ""
    if isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("size")
def size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    return render_template("error.html", status=e.code, title=e.name, message=e.description), e.code


def _portal_error(e: Exception):
    code, status = error_status(e)
    return render_template("error.html", status=status, title=code.replace("_", " "), message=str(e)), status


for _cls in (SlurmError, StorageError, ContainerError, PortalError):
    bp.register_error_handler(_cls, _portal_error)


def _owners(rows) -> dict[int, str]:
    ids = {r.user_id for r in rows}
    if not ids:
        return {}
    return dict(db().exec(select(User.id, User.name).where(User.id.in_(ids))).all())


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
                           filter_states=FILTER_STATES, owners=_owners(rows) if g.user.is_admin else {})


def _form_from_request(req: dict) -> dict[str, str]:
    """The new-job form's fields for a stored request (``/jobs/new?from=JOB``)."""
    env = req.get("env") or {}
    sweep = req.get("sweep") or {}
    return {"name": req.get("name") or "", "image": req.get("image") or "", "node_type": req.get("node_type") or "",
            "inputs": "\n".join(req.get("inputs") or []), "output": req.get("output") or "",
            "command": shlex.join(req.get("command") or []),
            "env": "\n".join("%s=%s" % kv for kv in env.items()),
            "time_limit": req.get("time_limit") or "", "project": req.get("project") or "",
            "sweep": "\n".join("%s=%s" % (k, ",".join(map(str, v))) for k, v in sweep.items())}


def _job_form_context() -> dict:
    user = g.user
    ready = db().exec(select(Image).where(Image.user_id == user.id, Image.state == ImageState.READY)
                      .order_by(Image.created_at.desc())).all()
    prefixes = []
    for rec in datasources.list_sources(db(), user):
        buckets = json.loads(rec.buckets_json or "[]")
        prefixes += [("s3://%s/" % b, "bucket %s (data source %s)" % (b, rec.name)) for b in buckets]
        if not buckets:
            prefixes.append(("s3://", "any bucket (data source %s)" % rec.name))
    # the service partition's node type is for inference replicas, not training jobs
    training = [t for t in _settings().node_types.values() if t.partition != "infer"]
    return {"node_types": training, "ready_images": ready, "prefixes": prefixes,
            "projects": accounts.projects_of(db(), user)}


@bp.route("/jobs/new", methods=["GET", "POST"])
@login_required
def new_job():
    """The create-training-job form: "Show script" renders the batch script (nothing is
    submitted); "Submit" stores and submits the job and goes to its page."""
    settings = _settings()
    ctx = _job_form_context()
    if request.method == "GET":
        form = {"time_limit": "01:00:00", "node_type": next(iter(settings.node_types), "")}
        if request.args.get("from"):
            form.update(_form_from_request(jobs.get_job(db(), g.user, request.args["from"]).request))
        return render_template("job_new.html", form=form, errors={}, top_errors=[], script=None, **ctx)

    form = {k: request.form.get(k, "") for k in JOB_FIELDS}
    body = dict(form, image=form["image"].strip() or request.form.get("image_select", "").strip())
    form["image_select"] = request.form.get("image_select", "")
    errors: dict[str, str] = {}
    top: list[str] = []
    script = None
    try:
        inp = jobs.parse_job_input(body)
        if request.form.get("action") == "script":
            script = jobs.render_script(settings, g.user, inp, db())
        else:
            job = jobs.submit_job(db(), settings, _backend(), _box(), g.user, inp)
            flash("job submitted as Slurm job %s" % job.slurm_job_id, "info")
            return redirect(url_for("web.job_page", job_id=job.id))
    except ValidationError as e:
        errors = {k: v for k, v in e.errors.items() if k in JOB_FIELDS}
        top = ["%s: %s" % kv for kv in e.errors.items() if kv[0] not in JOB_FIELDS]
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
        "job.html", job=job, req=req, owner=db().get(User, job.user_id), events=jobs.events_of(db(), job),
        command=shlex.join(req.get("command") or []), node_type=node_type, has_log=_has_log(job),
        # the plot comes from the log over SSH: the page's script fetches it (plot.svg), so a
        # slow or silent log host never holds the page
        plot=Markup(render_plot_svg([], job.name)), files=files, files_error=files_error,
        terminal=" ".join(sorted(s.value for s in TERMINAL)))


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


# -- cluster -----------------------------------------------------------------------------------

@bp.get("/cluster")
@login_required
def cluster():
    """Partitions, nodes, GPUs per node type and the queue, read live from Slurm."""
    settings = _settings()
    view = queue = error = None
    try:
        view = _backend().cluster()
        states = [s.state for s in _backend().queue().values()]
        queue = {"pending": states.count(JobState.PENDING), "running": states.count(JobState.RUNNING)}
    except SlurmError as e:
        error = str(e)
    by_type = []
    if view is not None:
        for t in settings.node_types.values():
            members = [n for n in view.nodes if t.partition in n.partitions]
            by_type.append({"type": t, "nodes": len(members), "gpus": sum(n.gpus for n in members),
                            "gpus_used": sum(n.gpus_used for n in members)})
    events = db().exec(select(Event).where(Event.node.is_not(None), Event.job_id.is_(None))
                       .order_by(Event.at.desc()).limit(50)).all()
    return render_template("cluster.html", view=view, queue=queue, error=error, by_type=by_type, events=events,
                           cluster_name=settings.cluster_name), 200 if error is None else 503


@bp.post("/cluster/nodes/<node>/drain")
@login_required
def drain_node(node: str):
    admin_required(g.user)
    try:
        nodes.drain(db(), _backend(), g.user, node, request.form.get("reason", ""))
        flash("%s is draining: it takes no new jobs; running jobs finish" % node, "info")
    except (ValidationError, SlurmError, ValueError) as e:
        flash("cannot drain %s: %s" % (node, e), "error")
    return redirect(url_for("web.cluster"))


@bp.post("/cluster/nodes/<node>/resume")
@login_required
def resume_node(node: str):
    admin_required(g.user)
    try:
        nodes.resume(db(), _backend(), g.user, node)
        flash("%s resumed" % node, "info")
    except (ValidationError, SlurmError, ValueError) as e:
        flash("cannot resume %s: %s" % (node, e), "error")
    return redirect(url_for("web.cluster"))


# -- images ------------------------------------------------------------------------------------

@bp.route("/images", methods=["GET", "POST"])
@login_required
def images_page():
    """Register an image; the user's images with their conversion state; the SIF cache."""
    settings = _settings()
    errors: dict[str, str] = {}
    top: list[str] = []
    ref = ""
    if request.method == "POST":
        ref = request.form.get("ref", "").strip()
        try:
            img = images.register_image(db(), settings, _backend(), g.user, ref)
            flash("image registered: %s" % img.state.value, "info")
            return redirect(url_for("web.images_page"))
        except ValidationError as e:
            errors = dict(e.errors)
        except (SlurmError, ContainerError, StorageError, PortalError, OSError) as e:
            top.append(str(e))
    try:
        rows = images.list_images(db(), settings, _backend(), g.user)
    except SlurmError as e:
        db().rollback()
        top.append("conversion states may be out of date: %s" % e)
        q = select(Image).order_by(Image.created_at.desc())
        rows = list(db().exec(q if g.user.is_admin else q.where(Image.user_id == g.user.id)))
    try:
        cache = images.cache_entries(db(), settings, g.user)
    except (OSError, ContainerError) as e:
        cache = []
        top.append("cannot read the image cache: %s" % e)
    return render_template("images.html", images=rows, cache=cache, ref=ref, errors=errors, top_errors=top,
                           image_cache=settings.image_cache), 422 if errors or (top and request.method == "POST") else 200


# -- data sources ------------------------------------------------------------------------------

SOURCE_FIELDS = ("name", "endpoint", "region", "access_key", "buckets", "bandwidth_mbps")


def _parent(prefix: str) -> str | None:
    """``s3://b/x/y`` -> ``s3://b/x``; ``s3://b/x`` -> ``s3://b``; ``s3://b`` -> None."""
    path = prefix[len("s3://"):].strip("/")
    if "/" not in path:
        return None
    return "s3://" + path.rsplit("/", 1)[0]


def _render_data(form: dict | None = None, errors: dict | None = None, top: list | None = None, status: int = 200):
    from storage.browse import list_prefix
    sources = datasources.list_sources(db(), g.user)
    browse = {"source": request.args.get("source", ""), "prefix": request.args.get("prefix", "").strip(),
              "listing": None, "error": None, "parent": None}
    if browse["source"] and request.method == "GET":
        try:
            rec = datasources.get_source(db(), g.user, browse["source"])
            if not browse["prefix"]:
                buckets = json.loads(rec.buckets_json or "[]")
                browse["prefix"] = "s3://%s" % buckets[0] if buckets else ""
            if browse["prefix"]:
                if not browse["prefix"].startswith("s3://") or len(browse["prefix"]) <= len("s3://"):
                    raise ValidationError("prefix", "give s3://bucket/prefix")
                browse["prefix"] = browse["prefix"].rstrip("/")
                browse["listing"] = list_prefix(datasources.open_record(_box(), rec), browse["prefix"],
                                                page_size=200, token=request.args.get("token") or None)
                browse["parent"] = _parent(browse["prefix"])
        except (PortalError, StorageError) as e:
            browse["error"] = str(e)
            status = error_status(e)[1]
    return render_template("data.html", sources=sources, public=datasources.public, browse=browse,
                           form=form or {"region": "us-east-1", "check": "1"}, errors=errors or {},
                           top_errors=top or []), status


@bp.get("/data")
@login_required
def data_page():
    return _render_data()


@bp.post("/data")
@login_required
def data_add():
    form = {k: request.form.get(k, "") for k in SOURCE_FIELDS}
    form["check"] = request.form.get("check", "")
    body = dict(form, secret_key=request.form.get("secret_key", ""))
    try:
        src = datasources.parse_source(form["name"].strip(), body)
        if form["check"]:
            datasources.check_access(src)
        datasources.add_source(db(), _box(), g.user, src)
        db().commit()
    except ValidationError as e:
        db().rollback()
        return _render_data(form, {k: v for k, v in e.errors.items() if k in SOURCE_FIELDS or k == "secret_key"},
                            ["%s: %s" % kv for kv in e.errors.items() if kv[0] not in SOURCE_FIELDS + ("secret_key",)],
                            422)
    except (StorageError, PortalError) as e:
        db().rollback()
        return _render_data(form, {}, [str(e)], 422)
    flash("data source %s added" % src.name, "info")
    return redirect(url_for("web.data_page"))


@bp.post("/data/<name>/delete")
@login_required
def data_delete(name: str):
    datasources.delete_source(db(), g.user, name)
    db().commit()
    flash("data source %s deleted" % name, "info")
    return redirect(url_for("web.data_page"))


# -- API tokens --------------------------------------------------------------------------------

@bp.route("/tokens", methods=["GET", "POST"])
@login_required
def tokens_page():
    """Create a token (shown once, in the answer to the POST), list and revoke."""
    new_token = None
    errors: dict[str, str] = {}
    name = ""
    if request.method == "POST":
        name = request.form.get("name", "").strip()[:64]
        raw = request.form.get("expires_days", "").strip()
        try:
            if raw and not raw.isdigit():
                raise ValidationError("expires_days", "a whole number of days, or empty for no expiry")
            new_token, _ = accounts.create_token(db(), g.user, name, int(raw) if raw else None)
            db().commit()
            name = ""
        except ValidationError as e:
            errors = dict(e.errors)
    body = render_template("tokens.html", tokens=accounts.list_tokens(db(), g.user), new_token=new_token,
                           name=name, errors=errors)
    return body, 422 if errors else 200, {"Cache-Control": "no-store"}


@bp.post("/tokens/<int:token_id>/revoke")
@login_required
def token_revoke(token_id: int):
    accounts.revoke_token(db(), g.user, token_id)
    db().commit()
    flash("token revoked", "info")
    return redirect(url_for("web.tokens_page"))



# -- inference services ------------------------------------------------------------------------

SERVICE_FIELDS = ("name", "image", "model", "model_file", "class_name", "version", "min_replicas", "max_replicas",
                  "gpus", "max_batch_size", "max_wait_ms")
_NUMBER_FIELDS = {"min_replicas": int, "max_replicas": int, "gpus": int, "max_batch_size": int, "max_wait_ms": float,
                  "target_inflight": float}


def _service_body(form: dict) -> dict:
    """A form's non-empty fields, numbers as numbers (a bad number is left for validation)."""
    body = {}
    for k, v in form.items():
        v = v.strip()
        if not v:
            continue
        if k in _NUMBER_FIELDS:
            try:
                v = _NUMBER_FIELDS[k](v)
            except ValueError:
                raise ValidationError(k, "must be a number") from None
        body[k] = v
    return body


def _render_services(form: dict | None = None, errors: dict | None = None, top: list | None = None,
                     status: int = 200):
    rows = inference.list_services(db(), g.user)
    replicas = {s.id: inference.replicas_of(db(), s) for s in rows}
    return render_template("services.html", services=rows, replicas=replicas, form=form or {"min_replicas": "1",
                           "max_replicas": "1", "class_name": "Model", "model_file": "model.py", "version": "1"},
                           errors=errors or {}, top_errors=top or [], portal_url=request.host_url.rstrip("/")), status


@bp.get("/services")
@login_required
def services_page():
    return _render_services()


@bp.post("/services")
@login_required
def service_deploy():
    form = {k: request.form.get(k, "") for k in SERVICE_FIELDS}
    try:
        svc = inference.deploy(db(), _settings(), _box(), g.user, _service_body(form))
    except ValidationError as e:
        db().rollback()
        return _render_services(form, {k: v for k, v in e.errors.items() if k in SERVICE_FIELDS},
                                ["%s: %s" % kv for kv in e.errors.items() if kv[0] not in SERVICE_FIELDS], 422)
    except (PortalError, StorageError, SlurmError) as e:
        db().rollback()
        return _render_services(form, {}, [str(e)], error_status(e)[1] if error_status(e)[1] != 500 else 422)
    flash("service %s deployed: its replicas are starting" % svc.name, "info")
    return redirect(url_for("web.services_page") + "#svc-" + svc.name)


@bp.post("/services/<name>/<action>")
@login_required
def service_action(name: str, action: str):
    form = {k: v for k, v in request.form.items() if k != "csrf"}
    try:
        if action == "scale":
            svc = inference.scale(db(), g.user, name, _service_body(form))
            flash("service %s: %d-%d replicas" % (name, svc.min_replicas, svc.max_replicas), "info")
        elif action == "update":
            inference.update(db(), _settings(), _box(), g.user, name, _service_body(form))
            flash("service %s: rolling update started" % name, "info")
        elif action == "delete":
            inference.delete(db(), g.user, name)
            flash("service %s: deleting" % name, "info")
        else:
            return _portal_error(ValidationError("action", "scale, update or delete"))
    except (PortalError, StorageError, SlurmError) as e:
        db().rollback()
        return _render_services(None, {}, ["%s: %s" % (name, e)], error_status(e)[1])
    return redirect(url_for("web.services_page") + "#svc-" + name)
