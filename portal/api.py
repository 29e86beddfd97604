"""JSON API under /api/v1."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from portal.auth import token_required

bp = Blueprint("api", __name__)


@bp.get("/cluster")
@token_required
def cluster():
    """Partitions, nodes (state, drain reason, CPUs, memory, GPUs total/used), read live from Slurm."""
    view = current_app.extensions["aiportal.slurm"].cluster()
    return jsonify(view.to_dict())
