"""The inference services pages."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for

from portal.auth import login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError, error_status
from portal.models.common import parse
from portal.models.services import ServiceCreate, ServiceScale, ServiceUpdate
from portal.services import inference
from slurm.errors import SlurmError
from storage.errors import StorageError
from portal.web.common import portal_error, bp, by_field


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
        svc = inference.deploy(db(), _settings(), _box(), g.user, parse(ServiceCreate, _service_body(form)),
                               _backend())
    except ValidationError as e:
        db().rollback()
        return _render_services(form, *by_field(e, SERVICE_FIELDS), 422)
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
            svc = inference.scale(db(), g.user, name, parse(ServiceScale, _service_body(form)))
            flash("service %s: %d-%d replicas" % (name, svc.min_replicas, svc.max_replicas), "info")
        elif action == "update":
            inference.update(db(), _settings(), _box(), g.user, name, parse(ServiceUpdate, _service_body(form)),
                             _backend())
            flash("service %s: rolling update started" % name, "info")
        elif action == "delete":
            inference.delete(db(), g.user, name)
            flash("service %s: deleting" % name, "info")
        elif action in ("public", "private"):
            inference.set_access(db(), g.user, name, action == "public")
            flash("service %s: %s" % (name, "public: anyone may call it without a token (rate-limited per address)"
                                      if action == "public" else "private: callers need a token or an invoke key"),
                  "info")
        else:
            return portal_error(ValidationError("action", "scale, update, public, private or delete"))
    except (PortalError, StorageError, SlurmError) as e:
        db().rollback()
        return _render_services(None, {}, ["%s: %s" % (name, e)], error_status(e)[1])
    return redirect(url_for("web.services_page") + "#svc-" + name)
