"""A job's pending stage-out: finish it from the portal, read the finishing job's log."""
from __future__ import annotations

from flask import Response, g

from portal.api.operations import answer, int_arg, operation, owners
from portal.db_session import backend, box, db, settings
from portal.logs import tail as logtail
from portal.models.jobs import JobPublic
from portal.services import accounts, jobs, stage_out
from portal.logs.stream import MAX_READ


@operation("POST", "/jobs/<job_id>/stage-out",
           "finish the job's pending stage-out: a Slurm job runs `aiportal stage out` as the job's user "
           "(stage_out_finish follows it; stage_out_pending is null once it succeeded)",
           {202: JobPublic}, (400, 404, 409, 422, 502, 503))
def finish_stage_out(job_id: str):
    """202 with the job (``stage_out_finish.state`` ``running``); 409 when nothing is pending,
    the job has not ended, or an attempt runs already; 404 for someone else's job."""
    job = jobs.get_job(db(), g.user, job_id)
    job = stage_out.request_finish(db(), settings(), backend(), box(), g.user, job)
    return answer(JobPublic.of(job, owners([job]).get(job.user_id)), 202)


@operation("GET", "/jobs/<job_id>/stage-out/log",
           "the log of the jobs that finished (or tried to finish) the stage-out, every attempt appended "
           "(plain text from ?offset)", {200: {"type": "string"}}, (404, 422, 503), media=("text/plain",),
           query={"offset": {"type": "integer", "minimum": 0}})
def stage_out_log(job_id: str):
    """``JOB_DIR/logs/stage-out.out`` from ``?offset=N``, read as the job's user like the job's
    log; ``X-Log-Offset`` is where to go on. Empty (200) while no attempt has written to it."""
    job = jobs.get_job(db(), g.user, job_id)
    offset = int_arg("offset", 0, 0, 1 << 50)
    if job.external or not job.job_dir:
        data, end = b"", offset
    else:
        target = logtail.target_for(settings(), accounts.owner_of(db(), job).unix_user)
        chunk = logtail.read_log(target, stage_out.log_path(job.job_dir), offset, MAX_READ)
        data, end = chunk.data, chunk.end
    return Response(data, mimetype="text/plain", headers={"X-Log-Offset": str(end), "Cache-Control": "no-store"})
