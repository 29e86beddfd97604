"""The data sources pages."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for

from portal.auth import login_required
from portal.db_session import box as _box
from portal.db_session import db
from portal.errors import PortalError, ValidationError, error_status
from portal.models.common import parse
from portal.models.datasources import DataSourceCreate, DataSourcePublic
from portal.services import datasources
import storage
from storage.errors import StorageError
from portal.web.common import bp, by_field


# -- data sources ------------------------------------------------------------------------------

SOURCE_FIELDS = ("name", "endpoint", "region", "access_key", "buckets", "bandwidth_mbps")


def _render_data(form: dict | None = None, errors: dict | None = None, top: list | None = None, status: int = 200):
    sources = datasources.list_sources(db(), g.user)
    browse = {"source": request.args.get("source", ""), "prefix": request.args.get("prefix", "").strip(),
              "listing": None, "error": None, "parent": None}
    if browse["source"] and request.method == "GET":
        try:
            rec = datasources.get_source(db(), g.user, browse["source"])
            browse["prefix"] = browse["prefix"] or storage.default_root(DataSourcePublic.of(rec)) or ""
            if browse["prefix"]:
                browse["prefix"] = browse["prefix"].rstrip("/")
                browse["listing"] = datasources.browse(db(), _box(), g.user, rec.name, browse["prefix"], 200,
                                                       request.args.get("token") or None)
                browse["parent"] = storage.parent(browse["prefix"])
        except (PortalError, StorageError) as e:
            browse["error"] = str(e)
            status = error_status(e)[1]
    public = [DataSourcePublic.of(r) for r in sources]
    # each bucket (or other root the source names) and where browsing it starts
    roots = {p.name: list(zip(p.buckets, storage.source_roots(p))) for p in public}
    return render_template("data.html", sources=public, roots=roots, browse=browse,
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
    body = dict(form, secret_key=request.form.get("secret_key", ""), check=bool(form["check"]))
    try:
        rec = datasources.register(db(), _box(), g.user, parse(DataSourceCreate, body))
        db().commit()
    except ValidationError as e:
        db().rollback()
        return _render_data(form, *by_field(e, SOURCE_FIELDS + ("secret_key",)), 422)
    except (StorageError, PortalError) as e:
        db().rollback()
        return _render_data(form, {}, [str(e)], 422)
    flash("data source %s added" % rec.name, "info")
    return redirect(url_for("web.data_page"))


@bp.post("/data/<name>/delete")
@login_required
def data_delete(name: str):
    datasources.delete_source(db(), g.user, name)
    db().commit()
    flash("data source %s deleted" % name, "info")
    return redirect(url_for("web.data_page"))
