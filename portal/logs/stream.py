"""A job's log for the web page and the API: read once, or streamed as Server-Sent Events.

The bytes come over SSH as the job's Unix user (:mod:`portal.logs.tail`), so the portal reads
only what that user could. Each SSE message carries the byte offset after it as its ``id``:
a browser (or ``aiportal logs -f``) that reconnects with ``Last-Event-ID`` resumes there.
"""
from __future__ import annotations

import codecs
import json
import threading
import time
from typing import Callable, Iterator

from flask import Flask, Response, stream_with_context
from sqlmodel import Session

from portal.logs import tail as logtail
from portal.logs.follow import follow_log
from portal.errors import NotFoundError
from portal.models import Job, User
from slurm.jobs import expand_output_path

MAX_READ = 1 << 20
PROGRESS_READ = 8 << 20


def log_path(job: Job, task: str | None = None, unix_user: str = "") -> str:
    """Where Slurm writes the job's log: ``--output`` in the rendered script, or for a job
    submitted with plain sbatch the path squeue showed, its symbols (%j, %x, ...) filled in."""
    if job.external:
        return _external_log_path(job, task, unix_user)
    if not job.job_dir or not job.slurm_job_id:
        raise NotFoundError("job %s has no log yet (it has not reached Slurm)" % job.id)
    if job.request.get("sweep"):
        if task is None:
            task = "0"
        if not str(task).isdigit():
            raise NotFoundError("task %r: give the array task number" % task)
        return "%s/logs/slurm-%s_%s.out" % (job.job_dir, job.slurm_job_id, task)
    return "%s/logs/slurm-%s.out" % (job.job_dir, job.slurm_job_id)


def _external_log_path(job: Job, task: str | None, unix_user: str) -> str:
    pattern = job.request.get("stdout")
    if not pattern or not job.slurm_job_id:
        raise NotFoundError("job %s was submitted with plain sbatch and the portal did not see where it writes its "
                            "log; look at `scontrol show job %s` (StdOut)" % (job.id, job.slurm_job_id))
    if job.request.get("array"):
        task = "0" if task is None else task
        if not str(task).isdigit():
            raise NotFoundError("task %r: give the array task number" % task)
    jid = job.slurm_job_id + ("_%s" % task if job.request.get("array") else "")
    path = expand_output_path(pattern, jid, job.name, unix_user, job.nodes)
    if path is None:
        raise NotFoundError("job %s writes its log to %r; the portal cannot fill in that pattern" % (job.id, pattern))
    return path


def _owner(db: Session, job: Job) -> User:
    return db.get(User, job.user_id)


def _target(settings, db: Session, job: Job) -> logtail.SshTarget:
    return logtail.target_for(settings, _owner(db, job).unix_user)


def read(settings, db: Session, job: Job, offset: int = 0, task: str | None = None) -> logtail.LogChunk:
    return logtail.read_log(_target(settings, db, job), log_path(job, task, _owner(db, job).unix_user), offset,
                            MAX_READ)


def progress(settings, db: Session, job: Job) -> list[logtail.Progress]:
    """Training progress from the log's ``step N, loss = X (...)`` lines (its first 8 MiB),
    one point per step: the last one logged (a requeued job that resumed redoes a few steps)."""
    try:
        chunk = logtail.read_log(_target(settings, db, job), log_path(job, None, _owner(db, job).unix_user), 0,
                                 PROGRESS_READ)
    except NotFoundError:
        return []
    points = {p.step: p for p in logtail.parse_progress(chunk.data.decode("utf-8", errors="replace"))}
    return [points[step] for step in sorted(points)]


#: one Server-Sent Event of a followed log (a job's or a build's), as the OpenAPI document
#: declares it: ``log`` with the text and the offset after it (also its id), or ``end``
LOG_EVENT_SCHEMA = {"oneOf": [
    {"type": "object", "required": ["event", "data", "id"], "properties": {
        "event": {"const": "log"}, "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["text", "offset"],
            "properties": {"text": {"type": "string"}, "offset": {"type": "integer", "minimum": 0}}}},
        "retry": {"type": "integer"}}},
    {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": "end"}, "id": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["state"], "properties": {"state": {"const": "ended"}}}},
        "retry": {"type": "integer"}}},
    {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": "denied"}, "id": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
            "type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}}},
        "retry": {"type": "integer"}}}],
    "description": "one event: `log` (data: {text, offset}; id: the offset to resume from with Last-Event-ID), "
                   "`end` (data: {state: ended}) once it is over, or `denied` (data: {message}) when the token or "
                   "session the stream was opened with has been revoked, has ended or has expired (the stream "
                   "ends; reconnecting needs a valid one); comments are heartbeats"}

#: how often a stream asks again whether its token or session is still valid
RECHECK_S = 10.0
DENIED = ("the token or session this stream was opened with is no longer valid (revoked, logged out, expired, "
          "or the account disabled)")


class Recheck:
    """``allowed`` asked again at most every ``every_s`` seconds (a database read): a stream
    outliving its credential ends within that."""

    def __init__(self, allowed: Callable[[], bool] | None, every_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.allowed, self.clock = allowed, clock
        self.every_s = RECHECK_S if every_s is None else every_s
        self.last = clock()

    def denied(self) -> bool:
        if self.allowed is None or self.clock() - self.last < self.every_s:
            return False
        self.last = self.clock()
        return not self.allowed()


def sse(event: str | None, data: dict, event_id: int | None = None) -> str:
    out = ""
    if event_id is not None:
        out += "id: %d\n" % event_id
    if event:
        out += "event: %s\n" % event
    return out + "data: %s\n\n" % json.dumps(data)


def _job_over(app: Flask, job_id: str) -> bool:
    with Session(app.extensions["aiportal.engine"]) as s:
        job = s.get(Job, job_id)
        return job is None or job.state.terminal


def follow_sse(target: logtail.SshTarget, path: str, offset: int, over: Callable[[], bool], *,
               heartbeat_s: float = 5.0, quiet_beats: int = 2, allowed: Callable[[], bool] | None = None,
               recheck_s: float | None = None) -> Iterator[str]:
    """SSE messages of one log file read as its owner (``target``): ``log`` events with text
    (UTF-8 decoded across chunk boundaries) and the next offset as id; a comment as heartbeat;
    ``end`` once ``over()`` says the writer is done and ``quiet_beats`` heartbeats passed without
    data (the log drained); ``denied`` (and the end of the stream) once ``allowed`` (the
    request's credential still valid, asked every ``recheck_s``) says no. Jobs, image builds
    and service replicas stream their logs with it."""
    recheck = Recheck(allowed, recheck_s)
    stop = threading.Event()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    yield "retry: 2000\n\n"
    quiet = 0
    chunks = follow_log(target, path, offset, heartbeat_s=heartbeat_s, stop=stop)
    try:
        for chunk in chunks:
            if recheck.denied():
                yield sse("denied", {"message": DENIED})
                return
            if chunk.data:
                quiet = 0
                end = chunk.offset + len(chunk.data)
                yield sse("log", {"text": decoder.decode(chunk.data), "offset": end}, end)
                continue
            # heartbeat: lets a proxy and the browser know we are alive; a gone client fails here
            yield ": heartbeat\n\n"
            quiet += 1
            if quiet >= quiet_beats and over():
                yield sse("end", {"state": "ended"})
                return
    finally:
        stop.set()
        chunks.close()


def stream(app: Flask, job: Job, user: User, offset: int, task: str | None,
           heartbeat_s: float = 5.0, allowed: Callable[[], bool] | None = None,
           recheck_s: float | None = None) -> Iterator[str]:
    """A job's log as SSE (:func:`follow_sse`), ending once the job is over."""
    settings = app.extensions["aiportal.settings"]
    with Session(app.extensions["aiportal.engine"]) as s:
        target = _target(settings, s, job)
        path = log_path(job, task, _owner(s, job).unix_user)
    return follow_sse(target, path, offset, lambda: _job_over(app, job.id), heartbeat_s=heartbeat_s,
                      allowed=allowed, recheck_s=recheck_s)


def sse_stream_response(messages: Iterator[str]) -> Response:
    """The streamed answer of :func:`follow_sse` messages (nginx must not buffer it)."""
    return Response(stream_with_context(messages), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def sse_response(app: Flask, job: Job, user: User, offset: int, task: str | None,
                 allowed: Callable[[], bool] | None = None) -> Response:
    with Session(app.extensions["aiportal.engine"]) as s:
        log_path(job, task, _owner(s, job).unix_user)      # refuse jobs without a log before the stream starts
    return sse_stream_response(stream(app, job, user, offset, task, allowed=allowed))
