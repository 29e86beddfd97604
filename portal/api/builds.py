"""Dockerfile builds: start one from a context tar, list, show, the log (offset or live), cancel."""
from __future__ import annotations

from flask import Response, current_app, g, request
from sqlmodel import Session

from portal.api.operations import BOOLEAN, answer, bool_arg, int_arg, operation, owners
from portal.auth import credential_check
from portal.db_session import backend, box, db, settings
from portal.errors import ValidationError
from portal.logs import tail as logtail
from portal.logs.stream import LOG_EVENT_SCHEMA, follow_sse, sse_stream_response
from portal.models import ImageBuild, User
from portal.models.builds import BuildList, BuildPublic
from portal.services import image_builds

_TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip",
              "application/octet-stream")


def _public(b: ImageBuild) -> BuildPublic:
    return BuildPublic.of(b, owners([b]).get(b.user_id))


@operation("POST", "/images/build", "build a Dockerfile in a Slurm job as the caller and push it "
           "(body: the context as a tar, Content-Type application/x-tar)", {202: BuildPublic},
           (400, 404, 422, 503), raw_body={"application/octet-stream": {
               "type": "string", "format": "binary", "description": "a tar (or tar.gz) of the build context; "
               "sent as application/x-tar, application/tar or application/gzip too"}},
           refuses="a body that is not a tar of the build context with its Dockerfile, a tag that is not "
                   "REGISTRY/REPOSITORY:TAG of a registry the caller has an account at", query={
               "tag": {"type": "string", "description": "REGISTRY/REPOSITORY:TAG to push"},
               "dockerfile": {"type": "string", "description": "the Dockerfile's path in the context (default Dockerfile)"}})
def start_build():
    if request.mimetype not in _TAR_TYPES:
        raise ValidationError("body", "send the build context as a tar with Content-Type: application/x-tar "
                                      "(tar -cf - -C CONTEXT . | curl --data-binary @- ...)")
    request.max_content_length = (settings().image_build_context_limit_mb << 20) + (1 << 20)
    build = image_builds.start_build(db(), settings(), backend(), box(), g.user, request.stream,
                                     request.args.get("tag", ""), request.args.get("dockerfile") or "Dockerfile")
    return answer(BuildPublic.of(build, g.user.name), 202, {"Location": "/api/v1/images/builds/%d" % build.id})


@operation("GET", "/images/builds", "the caller's builds, newest first (admins: all)", {200: BuildList}, (503,))
def list_builds():
    rows = image_builds.list_builds(db(), settings(), backend(), g.user)
    names = owners(rows)
    return answer(BuildList(builds=[BuildPublic.of(b, names.get(b.user_id)) for b in rows]))


@operation("GET", "/images/builds/<int:build_id>", "one build", {200: BuildPublic}, (404, 503))
def show_build(build_id: int):
    build = image_builds.get_build(db(), g.user, build_id)
    image_builds.refresh_builds(db(), settings(), backend(), [build])
    return answer(_public(build))


@operation("DELETE", "/images/builds/<int:build_id>", "cancel a build", {202: BuildPublic}, (404, 409, 503))
def cancel_build(build_id: int):
    build = image_builds.get_build(db(), g.user, build_id)
    return answer(_public(image_builds.cancel_build(db(), settings(), backend(), g.user, build)), 202)


@operation("GET", "/images/builds/<int:build_id>/log",
           "the build's log (plain text from ?offset; ?follow=1: Server-Sent Events until the build has ended)",
           {200: {"type": "string"}}, (404, 422, 503), media=("text/plain", "text/event-stream"),
           events=LOG_EVENT_SCHEMA, query={
               "offset": {"type": "integer", "minimum": 0}, "follow": BOOLEAN})
def build_log(build_id: int):
    offset, follow = int_arg("offset", 0, 0, 1 << 50), bool_arg("follow")
    build = image_builds.get_build(db(), g.user, build_id)
    if follow:
        last = request.headers.get("Last-Event-ID", "")
        if last.isdigit():
            offset = int(last)
        if not build.log_path:
            image_builds.read_log(settings(), db(), build, 0, 1)      # the NotFoundError it raises
        app = current_app._get_current_object()
        unix_user = db().get(User, build.user_id).unix_user
        return sse_stream_response(_stream(app, build.id, unix_user, build.log_path, offset,
                                           allowed=credential_check(app)))
    chunk = image_builds.read_log(settings(), db(), build, offset)
    return Response(chunk.data, mimetype="text/plain",
                    headers={"X-Log-Offset": str(chunk.offset + len(chunk.data)), "Cache-Control": "no-store"})


def _build_over(app, build_id: int) -> bool:
    with Session(app.extensions["aiportal.engine"], expire_on_commit=False) as s:
        build = s.get(ImageBuild, build_id)
        if build is None:
            return True
        image_builds.refresh_builds(s, app.extensions["aiportal.settings"], app.extensions["aiportal.slurm"], [build])
        return build.state.terminal


def _stream(app, build_id: int, unix_user: str, path: str, offset: int, heartbeat_s: float = 2.0,
            allowed=None):
    """The build's log as SSE (:func:`portal.logs.stream.follow_sse`), ending once the build has
    ended and its log is drained."""
    target = logtail.target_for(app.extensions["aiportal.settings"], unix_user)
    return follow_sse(target, path, offset, lambda: _build_over(app, build_id), heartbeat_s=heartbeat_s,
                      quiet_beats=1, allowed=allowed)