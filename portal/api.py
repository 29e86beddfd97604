"""JSON API under /api/v1 (OpenAPI document: /api/v1/openapi.json).

Errors are ``{"error": code, "message": ...}`` with 400 (bad request), 401 (no or bad token),
403 (not allowed), 404 (no such thing, or someone else's), 409 (conflict), 422 (invalid
fields; ``errors`` maps each field to its message), 429 (rate limit), 503 (Slurm or the log
host unreachable).
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, g, jsonify, request, stream_with_context
from sqlmodel import select

from portal import logstream
from portal.auth import api_auth
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import ForbiddenError, ValidationError
from portal.models import Event, User
from portal.openapi import openapi_document, query_parameters
from portal.services import accounts, datasources, images, inference, jobs, outputs
from slurm.states import JobState

bp = Blueprint("api", __name__)


@bp.before_request
def _known_query_parameters():
    """Unknown query parameters are refused (a typo like ?limt=5 is not silently ignored)."""
    if request.url_rule is None or not request.args:
        return None
    allowed = query_parameters(request.method if request.method != "HEAD" else "GET", request.url_rule.rule)
    unknown = set(request.args) - (allowed or set())
    if allowed is not None and unknown:
        raise ValidationError("query", "unknown parameters %s; this endpoint takes %s"
                              % (", ".join(sorted(unknown)), ", ".join(sorted(allowed)) or "none"))
    return None


def _body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValidationError("body", "send a JSON object with Content-Type: application/json")
    return body


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name, "must be a whole number") from None
    if not lo <= value <= hi:
        raise ValidationError(name, "must be between %d and %d" % (lo, hi))
    return value


def _owners(rows) -> dict[int, str]:
    ids = {r.user_id for r in rows}
    if not ids:
        return {}
    return dict(db().exec(select(User.id, User.name).where(User.id.in_(ids))).all())


@bp.get("/openapi.json")
@api_auth
def openapi():
    return jsonify(openapi_document())


@bp.get("/me")
@api_auth
def me():
    u = g.user
    return jsonify(name=u.name, unix_user=u.unix_user, is_admin=u.is_admin,
                   projects=[p.name for p in accounts.projects_of(db(), u)])


# -- jobs --------------------------------------------------------------------------------------

@bp.get("/jobs")
@api_auth
def list_jobs():
    limit = _int_arg("limit", 50, 1, 500)
    offset = _int_arg("offset", 0, 0, 10**9)
    states = []
    for s in request.args.getlist("state"):
        try:
            states.append(JobState(s.upper()))
        except ValueError:
            raise ValidationError("state", "unknown state %r" % s) from None
    rows, total = jobs.list_jobs(db(), g.user, limit, offset, states)
    names = _owners(rows)
    return jsonify(total=total, limit=limit, offset=offset,
                   jobs=[jobs.public(j, names.get(j.user_id)) for j in rows])


@bp.post("/jobs")
@api_auth
def submit_job():
    inp = jobs.parse_job_input(_body())
    job = jobs.submit_job(db(), _settings(), _backend(), _box(), g.user, inp)
    return jsonify(jobs.public(job, g.user.name)), 201, {"Location": "/api/v1/jobs/%s" % job.id}


@bp.post("/scripts")
@api_auth
def job_script():
    """The exact batch script a submission renders to (nothing is submitted)."""
    inp = jobs.parse_job_input(_body())
    return jsonify(script=jobs.render_script(_settings(), g.user, inp, db()))


@bp.get("/jobs/<job_id>")
@api_auth
def show_job(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    out = jobs.public(job, _owners([job]).get(job.user_id))
    out["script"] = job.script
    out["events"] = [jobs.public_event(e) for e in jobs.events_of(db(), job)]
    return jsonify(out)


@bp.post("/jobs/<job_id>/cancel")
@api_auth
def cancel_job(job_id: str):
    job = jobs.cancel_job(db(), _backend(), g.user, jobs.get_job(db(), g.user, job_id))
    return jsonify(jobs.public(job)), 202


@bp.post("/jobs/<job_id>/resubmit")
@api_auth
def resubmit_job(job_id: str):
    old = jobs.get_job(db(), g.user, job_id)
    job = jobs.resubmit_job(db(), _settings(), _backend(), _box(), g.user, old)
    return jsonify(jobs.public(job)), 201, {"Location": "/api/v1/jobs/%s" % job.id}


@bp.get("/jobs/<job_id>/log")
@api_auth
def job_log(job_id: str):
    """The job's log: ``?offset=N`` bytes on (plain text, ``X-Log-Offset`` is where to go on);
    ``?follow=1`` streams it as Server-Sent Events until the job has ended."""
    job = jobs.get_job(db(), g.user, job_id)
    offset = _int_arg("offset", 0, 0, 1 << 50)
    task = request.args.get("task")
    if request.args.get("follow") in ("1", "true", "yes"):
        last = request.headers.get("Last-Event-ID", "")
        if last.isdigit():
            offset = int(last)
        return logstream.sse_response(current_app._get_current_object(), job, g.user, offset, task)
    chunk = logstream.read(_settings(), db(), job, offset, task)
    return Response(chunk.data, mimetype="text/plain",
                    headers={"X-Log-Offset": str(chunk.offset + len(chunk.data)), "Cache-Control": "no-store"})


@bp.get("/jobs/<job_id>/progress")
@api_auth
def job_progress(job_id: str):
    """Training progress parsed from the log: ``step N, loss = X (Y examples/sec; Z sec/batch)``."""
    job = jobs.get_job(db(), g.user, job_id)
    return jsonify(points=[p.__dict__ for p in logstream.progress(_settings(), db(), job)])


@bp.get("/jobs/<job_id>/outputs")
@api_auth
def job_outputs(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    files = outputs.list_outputs(job.job_dir) if job.job_dir else []
    return jsonify(output=job.request.get("output"), files=[
        {"path": f.path, "size": f.size, "url": "/api/v1/jobs/%s/outputs/%s" % (job.id, f.path)} for f in files])


@bp.get("/jobs/<job_id>/outputs/<path:rel>")
@api_auth
def job_output_file(job_id: str, rel: str):
    job = jobs.get_job(db(), g.user, job_id)
    owner = db().get(User, job.user_id)
    data = outputs.stream_output(owner.unix_user, job.job_dir, rel)
    name = rel.rsplit("/", 1)[-1].replace('"', "")
    return Response(stream_with_context(data), mimetype="application/octet-stream",
                    headers={"Content-Disposition": 'attachment; filename="%s"' % name})


# -- cluster -----------------------------------------------------------------------------------

@bp.get("/cluster")
@api_auth
def cluster():
    """Partitions, nodes (state, drain reason, CPUs, memory, GPUs total/used), queue length,
    recent node events; read live from Slurm."""
    view = _backend().cluster().to_dict()
    view["queue"] = {"pending": len([1 for s in _backend().queue().values() if s.state is JobState.PENDING]),
                     "running": len([1 for s in _backend().queue().values() if s.state is JobState.RUNNING])}
    events = db().exec(select(Event).where(Event.node.is_not(None), Event.job_id.is_(None))
                       .order_by(Event.at.desc()).limit(50)).all()
    view["events"] = [jobs.public_event(e) for e in events]
    return jsonify(view)


@bp.post("/cluster/nodes/<node>/drain")
@api_auth
def drain_node(node: str):
    from portal.services import nodes
    if not g.user.is_admin:
        raise ForbiddenError("only admins may drain nodes")
    reason = _body().get("reason")
    if not isinstance(reason, str):
        raise ValidationError("reason", "give a one-line reason (a string)")
    nodes.drain(db(), _backend(), g.user, node, reason)
    return jsonify(node=node, state="DRAIN", reason=reason), 202


@bp.post("/cluster/nodes/<node>/resume")
@api_auth
def resume_node(node: str):
    from portal.services import nodes
    if not g.user.is_admin:
        raise ForbiddenError("only admins may resume nodes")
    nodes.resume(db(), _backend(), g.user, node)
    return jsonify(node=node, state="RESUME"), 202


# -- images ------------------------------------------------------------------------------------

@bp.get("/images")
@api_auth
def list_images():
    rows = images.list_images(db(), _settings(), _backend(), g.user)
    return jsonify(images=[images.public(i) for i in rows])


@bp.post("/images")
@api_auth
def register_image():
    ref = _body().get("ref")
    if not isinstance(ref, str):
        raise ValidationError("ref", "give the image reference as a string")
    ref = ref.strip()
    img = images.register_image(db(), _settings(), _backend(), g.user, ref)
    return jsonify(images.public(img)), 201


@bp.get("/images/cache")
@api_auth
def image_cache():
    """The shared SIF cache (admins: every entry; users: the entries of their images)."""
    return jsonify(entries=images.cache_entries(db(), _settings(), g.user))


# -- data sources ------------------------------------------------------------------------------

@bp.get("/datasources")
@api_auth
def list_datasources():
    return jsonify(datasources=[datasources.public(r) for r in datasources.list_sources(db(), g.user)])


@bp.post("/datasources")
@api_auth
def add_datasource():
    body = _body()
    if not isinstance(body.get("name"), str):
        raise ValidationError("name", "give the data source a name (a string)")
    if not isinstance(body.get("check", True), bool):
        raise ValidationError("check", "true or false")
    src = datasources.parse_source(body["name"], body)
    if body.get("check", True):
        datasources.check_access(src)
    rec = datasources.add_source(db(), _box(), g.user, src)
    db().commit()
    return jsonify(datasources.public(rec)), 201


@bp.delete("/datasources/<name>")
@api_auth
def delete_datasource(name: str):
    datasources.delete_source(db(), g.user, name)
    db().commit()
    return "", 204


@bp.get("/datasources/<name>/browse")
@api_auth
def browse_datasource(name: str):
    """One level of ``?prefix=s3://bucket/prefix`` on the data source."""
    from storage.browse import list_prefix
    src = datasources.open_record(_box(), datasources.get_source(db(), g.user, name))
    prefix = request.args.get("prefix", "")
    if not prefix.startswith("s3://"):
        raise ValidationError("prefix", "give ?prefix=s3://bucket/prefix")
    listing = list_prefix(src, prefix, page_size=_int_arg("limit", 1000, 1, 1000), token=request.args.get("token"))
    return jsonify(prefix=prefix, next_token=listing.next_token, entries=[
        {"name": e.name, "uri": e.uri, "is_dir": e.is_dir, "size": e.size,
         "last_modified": e.last_modified.isoformat() if e.last_modified else None} for e in listing.entries])


# -- API tokens --------------------------------------------------------------------------------

@bp.get("/tokens")
@api_auth
def list_tokens():
    return jsonify(tokens=[{"id": t.id, "name": t.name, "prefix": t.prefix, "created_at": t.created_at.isoformat(),
                            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
                            "expires_at": t.expires_at.isoformat() if t.expires_at else None,
                            "revoked": t.revoked_at is not None} for t in accounts.list_tokens(db(), g.user)])


@bp.post("/tokens")
@api_auth
def create_token():
    body = request.get_json(silent=True) if request.data else {}
    if not isinstance(body, dict):
        raise ValidationError("body", "send a JSON object (or nothing)")
    days, name = body.get("expires_days"), body.get("name", "")
    if days is not None and (isinstance(days, bool) or not isinstance(days, int)):
        raise ValidationError("expires_days", "a whole number of days")
    if not isinstance(name, str):
        raise ValidationError("name", "a string")
    token, rec = accounts.create_token(db(), g.user, name[:64], days)
    db().commit()
    return jsonify(id=rec.id, token=token, prefix=rec.prefix,
                   message="copy the token now: it is not shown again"), 201


@bp.delete("/tokens/<int:token_id>")
@api_auth
def revoke_token(token_id: int):
    accounts.revoke_token(db(), g.user, token_id)
    db().commit()
    return "", 204



# -- inference services ------------------------------------------------------------------------

def _service_out(svc):
    return inference.public(svc, inference.replicas_of(db(), svc), _owners([svc]).get(svc.user_id))


@bp.get("/services")
@api_auth
def list_services():
    rows = inference.list_services(db(), g.user)
    names = _owners(rows)
    return jsonify(services=[inference.public(s, inference.replicas_of(db(), s), names.get(s.user_id)) for s in rows])


@bp.post("/services")
@api_auth
def deploy_service():
    """Deploy a service: its replicas are submitted by the controller within a cycle."""
    svc = inference.deploy(db(), _settings(), _box(), g.user, _body())
    return jsonify(_service_out(svc)), 201, {"Location": "/api/v1/services/%s" % svc.name}


@bp.get("/services/<name>")
@api_auth
def show_service(name: str):
    return jsonify(_service_out(inference.get_service(db(), g.user, name)))


@bp.post("/services/<name>/scale")
@api_auth
def scale_service(name: str):
    return jsonify(_service_out(inference.scale(db(), g.user, name, _body())))


@bp.post("/services/<name>/update")
@api_auth
def update_service(name: str):
    """A rolling update to the spec with the given fields changed (e.g. version, model)."""
    return jsonify(_service_out(inference.update(db(), _settings(), _box(), g.user, name, _body()))), 202


@bp.delete("/services/<name>")
@api_auth
def delete_service(name: str):
    return jsonify(_service_out(inference.delete(db(), g.user, name))), 202
