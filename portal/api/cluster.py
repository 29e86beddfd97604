"""The cluster (read live from Slurm) and admins' node actions."""
from __future__ import annotations

from flask import g, jsonify
from pydantic import ConfigDict
from sqlmodel import SQLModel

from portal.api.operations import body, operation
from portal.auth import admin_required
from portal.db_session import backend, db, settings
from portal.models.jobs import EventPublic
from portal.services import nodes
from portal.services.cluster import cluster_page

_NODE_ACTION = {"type": "object", "properties": {"node": {"type": "string"}, "state": {"type": "string"},
                                                 "reason": {"type": "string"}}}


class DrainRequest(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str


@operation("GET", "/cluster", "partitions, nodes (state, drain reason, CPUs, memory, GPUs total/used), the queue, "
           "recent node events; read live from Slurm", {200: {"type": "object"}}, (503,))
def cluster():
    page = cluster_page(db(), settings(), backend())
    out = page.to_dict()
    out["events"] = [EventPublic.of(e).model_dump(mode="json") for e in page.events]
    return jsonify(out)


@operation("POST", "/cluster/nodes/<node>/drain", "drain a node (admins)", {202: _NODE_ACTION},
           (400, 403, 422, 503), body=DrainRequest)
def drain_node(node: str):
    admin_required(g.user)
    reason = body(DrainRequest).reason
    nodes.drain(db(), backend(), g.user, node, reason)
    return jsonify(node=node, state="DRAIN", reason=reason), 202


@operation("POST", "/cluster/nodes/<node>/resume", "resume a node (admins)", {202: _NODE_ACTION}, (403, 422, 503))
def resume_node(node: str):
    admin_required(g.user)
    nodes.resume(db(), backend(), g.user, node)
    return jsonify(node=node, state="RESUME"), 202
