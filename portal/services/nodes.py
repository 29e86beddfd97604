"""Admins drain and resume nodes from the portal; each is an event on the cluster page.

A drain from the portal carries the admin's reason as typed (it must not start with
``aiportal:``, the prefix the health monitor owns: the monitor resumes only its own drains, so
an admin's drain is never undone by passing checks).
"""
from __future__ import annotations

import re

from sqlmodel import Session

from portal.errors import ValidationError
from portal.models import Event, EventKind, NodeCondition, User
from portal.recovery import record_node

MONITOR_PREFIX = "aiportal:"
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason or "\n" in reason or len(reason) > 200:
        raise ValidationError("reason", "give a one-line reason (up to 200 characters), e.g. 'replacing GPU 2'")
    if reason.lower().startswith(MONITOR_PREFIX):
        raise ValidationError("reason", "reasons starting with %r belong to the health monitor" % MONITOR_PREFIX)
    return reason


def check_node(node: str) -> str:
    if not _NODE_RE.match(node or ""):
        raise ValidationError("node", "%r is not a node name" % (node,))
    return node


def drain(db: Session, backend, admin: User, node: str, reason: str) -> None:
    reason = check_reason(reason)
    slurm_reason = "%s (%s)" % (reason, admin.name)
    backend.drain(check_node(node), slurm_reason)
    # recorded as the monitor's node record too, so its next look at Slurm adds no second event
    record_node(db, node, NodeCondition.DRAIN, slurm_reason, event=Event(
        kind=EventKind.DRAIN, node=node, user_id=admin.id, message="drained by %s: %s" % (admin.name, reason)))
    db.commit()


def resume(db: Session, backend, admin: User, node: str) -> None:
    backend.resume(check_node(node))
    record_node(db, node, NodeCondition.UP, "", event=Event(
        kind=EventKind.RESUME, node=node, user_id=admin.id, message="resumed by %s" % admin.name))
    db.commit()
