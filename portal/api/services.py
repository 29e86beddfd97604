"""Inference services: deploy, list, show, scale, update (rolling or gray), delete."""
from __future__ import annotations

from flask import g

from inference.service import NAME_RE
from portal.api.idempotency import KEY_HEADER, Stored, idempotent
from portal.api.operations import answer, body, operation, owners
from portal.db_session import backend, box, db, settings
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
