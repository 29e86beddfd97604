"""Training jobs: submit, show the script, list, show, cancel, resubmit, log, progress, outputs."""
from __future__ import annotations

from flask import Response, current_app, g, jsonify, request, stream_with_context

from portal.api.idempotency import KEY_HEADER, Stored, idempotent
from portal.api.operations import BOOLEAN, answer, bool_arg, body, int_arg, operation, owners
from portal.auth import credential_check
from portal.db_session import backend, box, db, settings
from portal.errors import ValidationError
from portal.logs import stream as logstream
from portal.logs.stream import LOG_EVENT_SCHEMA
from portal.models import Job
from portal.models.jobs import EventPublic, JobCreate, JobDetail, JobPage, JobPublic
from portal.services import accounts, jobs, outputs
from slurm.states import JobState

_WRITE_ERRORS = (400, 403, 404, 409, 422, 502, 503)
_OUTPUTS = {"type": "object", "properties": {"output": {"type": ["string", "null"]}, "files": {"type": "array", "items": {
    "type": "object", "properties": {"path": {"type": "string"}, "size": {"type": "integer"},
                                     "url": {"type": "string"}}}}}}
#: what a submission's 422 may say that the document cannot
_SITE = ("an image that does not exist or the caller cannot read, a node type, GPU count, time limit or project "
         "this site does not have, a data location or output that does not exist or is not the caller's, a command "
         "that does not split into words")
_PROGRESS = {"type": "object", "properties": {"points": {"type": "array", "items": {"type": "object"}}}}


@operation("GET", "/jobs", "jobs the caller may see, newest first", {200: JobPage}, (422,), query={
    "limit": {"type": "integer", "minimum": 1, "maximum": 500}, "offset": {"type": "integer", "minimum": 0},
    "state": {"type": "string", "enum": [s.value for s in JobState] + [s.value.lower() for s in JobState],
              "description": "only jobs in this state (repeatable)"}})
def list_jobs():
    limit = int_arg("limit", 50, 1, 500)
    offset = int_arg("offset", 0, 0, 10**9)
    states = []
    for s in request.args.getlist("state"):
        try:
            states.append(JobState(s.upper()))
        except ValueError:
            raise ValidationError("state", "unknown state %r" % s) from None
    rows, total = jobs.list_jobs(db(), g.user, limit, offset, states)
    names = owners(rows)
    return answer(JobPage(total=total, limit=limit, offset=offset,
                          jobs=[JobPublic.of(j, names.get(j.user_id)) for j in rows]))


def _created(job: Job):
    return answer(JobPublic.of(job, g.user.name), 201, {"Location": "/api/v1/jobs/%s" % job.id})


def _stored_job(job_id: str) -> Stored | None:
    job = db().get(Job, job_id, populate_existing=True)
    return None if job is None else Stored(_created(job), settled=job.state is not JobState.SUBMITTING)


@operation("POST", "/jobs", "submit a training job", {201: JobPublic}, _WRITE_ERRORS, body=JobCreate,
           headers=KEY_HEADER, refuses=_SITE)
def submit_job():
    """With an ``Idempotency-Key``, a retry gets the first answer again, never a second job."""
    create = body(JobCreate)
    return idempotent(lambda job_id: _created(jobs.submit_job(db(), settings(), backend(), box(), g.user, create,
                                                              job_id=job_id)), _stored_job)


@operation("POST", "/scripts", "the exact batch script a submission renders to (nothing is submitted)",
           {200: {"type": "object", "required": ["script"], "properties": {"script": {"type": "string"}}}},
           (400, 422), body=JobCreate, refuses=_SITE)
def job_script():
    return jsonify(script=jobs.render_script(db(), settings(), g.user, body(JobCreate)))


@operation("GET", "/jobs/<job_id>", "one job with its script and timeline", {200: JobDetail}, (404,))
def show_job(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    public = JobPublic.of(job, owners([job]).get(job.user_id))
    return answer(JobDetail(**public.__dict__, script=job.script,
                            events=[EventPublic.of(e) for e in jobs.events_of(db(), job)]))


@operation("POST", "/jobs/<job_id>/cancel", "cancel a job", {202: JobPublic}, (404, 409, 503))
def cancel_job(job_id: str):
    job = jobs.cancel_job(db(), backend(), g.user, jobs.get_job(db(), g.user, job_id))
    return answer(JobPublic.of(job), 202)


@operation("POST", "/jobs/<job_id>/resubmit", "submit a new job with the same request", {201: JobPublic},
           _WRITE_ERRORS)
def resubmit_job(job_id: str):
    old = jobs.get_job(db(), g.user, job_id)
    job = jobs.resubmit_job(db(), settings(), backend(), box(), g.user, old)
    return answer(JobPublic.of(job), 201, {"Location": "/api/v1/jobs/%s" % job.id})


@operation("GET", "/jobs/<job_id>/log", "the job's log (plain text from ?offset; ?follow=1: Server-Sent Events)",
           {200: {"type": "string"}}, (404, 422, 503), media=("text/plain", "text/event-stream"),
           events=LOG_EVENT_SCHEMA, query={
               "offset": {"type": "integer", "minimum": 0}, "follow": BOOLEAN,
               "task": {"type": "string", "description": "array task"}})
def job_log(job_id: str):
    """``?offset=N`` bytes on (``X-Log-Offset`` is where to go on); ``?follow=1`` streams it as
    Server-Sent Events until the job has ended."""
    offset, follow = int_arg("offset", 0, 0, 1 << 50), bool_arg("follow")
    job = jobs.get_job(db(), g.user, job_id)
    task = request.args.get("task")
    if follow:
        last = request.headers.get("Last-Event-ID", "")
        if last.isdigit():
            offset = int(last)
        app = current_app._get_current_object()
        return logstream.sse_response(app, job, g.user, offset, task, allowed=credential_check(app))
    chunk = logstream.read(settings(), db(), job, offset, task)
    return Response(chunk.data, mimetype="text/plain",
                    headers={"X-Log-Offset": str(chunk.offset + len(chunk.data)), "Cache-Control": "no-store"})


@operation("GET", "/jobs/<job_id>/progress", "loss and examples/sec parsed from the log", {200: _PROGRESS},
           (404, 503))
def job_progress(job_id: str):
    """Training progress parsed from the log: ``step N, loss = X (Y examples/sec; Z sec/batch)``."""
    job = jobs.get_job(db(), g.user, job_id)
    return jsonify(points=[p.__dict__ for p in logstream.progress(settings(), db(), job)])


@operation("GET", "/jobs/<job_id>/outputs", "files in the job's output folder", {200: _OUTPUTS}, (404,))
def job_outputs(job_id: str):
    job = jobs.get_job(db(), g.user, job_id)
    files = outputs.list_outputs(job.job_dir) if job.job_dir else []
    return jsonify(output=job.request.get("output"), files=[
        {"path": f.path, "size": f.size, "url": "/api/v1/jobs/%s/outputs/%s" % (job.id, f.path)} for f in files])


@operation("GET", "/jobs/<job_id>/outputs/<path:rel>", "one output file (a download)",
           {200: {"type": "string", "format": "binary"}}, (404, 422), media=("application/octet-stream",))
def job_output_file(job_id: str, rel: str):
    job = jobs.get_job(db(), g.user, job_id)
    owner = accounts.owner_of(db(), job)
    data = outputs.stream_output(owner.unix_user, job.job_dir, rel)
    name = rel.rsplit("/", 1)[-1].replace('"', "")
    return Response(stream_with_context(data), mimetype="application/octet-stream",
                    headers={"Content-Disposition": 'attachment; filename="%s"' % name})
