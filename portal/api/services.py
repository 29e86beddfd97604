"""Inference services: deploy, list, show, scale, update (rolling or gray), delete."""
from __future__ import annotations

from flask import Response, current_app, g, request
from sqlmodel import Session

from inference.service import NAME_RE
from portal.api.idempotency import KEY_HEADER, Stored, idempotent
from portal.api.operations import BOOLEAN, answer, bool_arg, body, int_arg, operation, owners
from portal.auth import credential_check
from portal.db_session import backend, box, db, settings
from portal.logs import tail as logtail
from portal.logs.stream import LOG_EVENT_SCHEMA, MAX_READ, follow_sse, sse_stream_response
from portal.models import Service
from portal.models.services import (ServiceAccess, ServiceCreate, ServiceList, ServicePublic, ServiceScale,
                                    ServiceUpdate)
from portal.services import inference


#: a service's name in a path, as deploying checks it
_NAME = {"name": {"type": "string", "pattern": NAME_RE.pattern}}
#: what a deployment's 422 may say that the document cannot
_SITE = ("an image or model location that does not exist or the caller cannot read, a model file or class name "
         "that is not a .py file in the model location or a Python name, a replica range with max below min")


def _out(svc, status: int = 200, headers=None):
    """A service with its replicas, as the answer."""
    return answer(ServicePublic.of(svc, inference.replicas_of(db(), svc), owners([svc]).get(svc.user_id)),
                  status, headers)


@operation("GET", "/services", "the caller's inference services (admins: all)", {200: ServiceList})
def list_services():
    rows = inference.list_services(db(), g.user)
    names = owners(rows)
    return answer(ServiceList(services=[ServicePublic.of(s, inference.replicas_of(db(), s), names.get(s.user_id))
                                        for s in rows]))


def _deployed(svc: Service):
    return _out(svc, 201, {"Location": "/api/v1/services/%s" % svc.name})


def _stored_service(service_id: str) -> Stored | None:
    svc = db().get(Service, service_id, populate_existing=True)
    return None if svc is None else Stored(_deployed(svc))


@operation("POST", "/services", "deploy a service: replicas on the infer partition behind POST|PUT /service/NAME",
           {201: ServicePublic}, (400, 403, 409, 422, 503), body=ServiceCreate, headers=KEY_HEADER, refuses=_SITE)
def deploy_service():
    """Its replicas are submitted by the controller within a cycle. With an ``Idempotency-Key``,
    a retry gets the first answer again."""
    create = body(ServiceCreate)
    return idempotent(lambda service_id: _deployed(inference.deploy(db(), settings(), box(), g.user, create,
                                                                    backend(), service_id=service_id)),
                      _stored_service)


@operation("GET", "/services/<name>", "a service and its replicas (state DELETING: being deleted)",
           {200: ServicePublic}, (404,), params=_NAME)
def show_service(name: str):
    return _out(inference.get_service(db(), g.user, name))


@operation("POST", "/services/<name>/scale", "set the replica count or the autoscaling range", {200: ServicePublic},
           (400, 404, 409, 422), body=ServiceScale, params=_NAME)
def scale_service(name: str):
    return _out(inference.scale(db(), g.user, name, body(ServiceScale)))


@operation("POST", "/services/<name>/access", "who may call it: public (anyone, without a token, rate-limited "
           "per client address) or not (a token of the owner's, or an invoke key)", {200: ServicePublic},
           (400, 404, 409, 422), body=ServiceAccess, params=_NAME)
def service_access(name: str):
    return _out(inference.set_access(db(), g.user, name, body(ServiceAccess).public))


@operation("POST", "/services/<name>/update", "a new version: rolling update (one replica at a time), or gray "
           "release with a weight", {202: ServicePublic}, (400, 403, 404, 409, 422, 503), body=ServiceUpdate,
           params=_NAME, refuses=_SITE)
def update_service(name: str):
    return _out(inference.update(db(), settings(), box(), g.user, name, body(ServiceUpdate), backend()), 202)


@operation("DELETE", "/services/<name>", "delete a service: 202 with its state DELETING while the controller "
           "stops its replicas (GET shows DELETING until the last has ended, then 404)", {202: ServicePublic}, (404,),
           params=_NAME)
def delete_service(name: str):
    return _out(inference.delete(db(), g.user, name), 202)


@operation("GET", "/services/<name>/replicas/<replica>/log",
           "a replica's log (plain text from ?offset; ?follow=1: Server-Sent Events until the replica has ended); "
           "replica: its id or its number (0 the oldest, as GET /services/NAME lists them)",
           {200: {"type": "string"}}, (404, 422, 503), media=("text/plain", "text/event-stream"),
           events=LOG_EVENT_SCHEMA, params={**_NAME, "replica": {"type": "string"}},
           query={"offset": {"type": "integer", "minimum": 0}, "follow": BOOLEAN})
def replica_log(name: str, replica: str):
    offset, follow = int_arg("offset", 0, 0, 1 << 50), bool_arg("follow")
    rep, unix_user, path = inference.replica_log(db(), g.user, name, replica)
    target = logtail.target_for(settings(), unix_user)
    if follow:
        last = request.headers.get("Last-Event-ID", "")
        if last.isdigit():
            offset = int(last)
        app = current_app._get_current_object()
        engine, rep_id = app.extensions["aiportal.engine"], rep.id

        def over() -> bool:
            with Session(engine) as s:
                return inference.replica_over(s, rep_id)
        return sse_stream_response(follow_sse(target, path, offset, over, allowed=credential_check(app)))
    chunk = logtail.read_log(target, path, offset, MAX_READ)
    return Response(chunk.data, mimetype="text/plain",
                    headers={"X-Log-Offset": str(chunk.offset + len(chunk.data)), "Cache-Control": "no-store"})
