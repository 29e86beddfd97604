"""The cluster pages."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for

from portal.auth import admin_required, login_required
from portal.db_session import backend as _backend
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import ValidationError
from portal.services import nodes
from portal.services.cluster import cluster_page, node_events
from slurm.errors import SlurmError
from portal.web.common import bp


# -- cluster -----------------------------------------------------------------------------------

@bp.get("/cluster")
@login_required
def cluster():
    """Partitions, nodes, GPUs per node type and the queue, read live from Slurm."""
    settings = _settings()
    try:
        page = cluster_page(db(), settings, _backend())
    except SlurmError as e:
        return render_template("cluster.html", view=None, queue=None, error=str(e), by_type=[],
                               events=node_events(db()), cluster_name=settings.cluster_name), 503
    return render_template("cluster.html", view=page.view, queue={"pending": page.pending, "running": page.running},
                           error=None, by_type=page.by_type, events=page.events, cluster_name=settings.cluster_name)


@bp.post("/cluster/nodes/<node>/drain")
@login_required
def drain_node(node: str):
    admin_required(g.user)
    try:
        nodes.drain(db(), _backend(), g.user, node, request.form.get("reason", ""))
        flash("%s is draining: it takes no new jobs; running jobs finish" % node, "info")
    except (ValidationError, SlurmError, ValueError) as e:
        flash("cannot drain %s: %s" % (node, e), "error")
    return redirect(url_for("web.cluster"))


@bp.post("/cluster/nodes/<node>/resume")
@login_required
def resume_node(node: str):
    admin_required(g.user)
    try:
        nodes.resume(db(), _backend(), g.user, node)
        flash("%s resumed" % node, "info")
    except (ValidationError, SlurmError, ValueError) as e:
        flash("cannot resume %s: %s" % (node, e), "error")
    return redirect(url_for("web.cluster"))
