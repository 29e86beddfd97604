"""Server-rendered pages (no JS build step)."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template

from portal.auth import login_required
from slurm.errors import SlurmError

bp = Blueprint("web", __name__)


@bp.get("/")
@login_required
def status():
    settings = current_app.extensions["aiportal.settings"]
    error = None
    view = None
    try:
        view = current_app.extensions["aiportal.slurm"].cluster()
    except SlurmError as e:
        error = str(e)
    return render_template("status.html", view=view, error=error, node_types=settings.node_types,
                           cluster_name=settings.cluster_name)
