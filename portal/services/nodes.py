"""Admins drain and resume nodes from the portal; each is an event on the cluster page.

A drain from the portal carries the admin's reason as typed (it must not start with
``aiportal:`` (:data:`monitor.ownership.DRAIN_PREFIX`, matched by
:func:`monitor.ownership.owned_by_aiportal`), the prefix the health monitor owns: the monitor resumes only its own drains, so
an admin's drain is never undone by passing checks).
"""
from __future__ import annotations

import re

from sqlmodel import Session

from monitor.ownership import DRAIN_PREFIX, owned_by_aiportal
from portal.errors import ValidationError
from portal.models import Event, EventKind, NodeCondition, NodeRecord, User, utcnow
from portal.services.notify import notify_wanted
from portal.settings import Settings

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason or "\n" in reason or len(reason) > 200:
        raise ValidationError("reason", "give a one-line reason (up to 200 characters), e.g. 'replacing GPU 2'")
    if owned_by_aiportal(reason):
        raise ValidationError("reason", "reasons starting with %r belong to the health monitor" % DRAIN_PREFIX)
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


_NODE_KIND = {NodeCondition.DRAIN: EventKind.DRAIN, NodeCondition.DOWN: EventKind.NODE_DOWN,
              NodeCondition.UP: EventKind.RESUME}


def node_message(before: NodeCondition | None, after: NodeCondition, reason: str, before_reason: str = "") -> str:
    if after is NodeCondition.DRAIN:
        who = "by the health check" if owned_by_aiportal(reason) else "by an admin"
        return "drained %s: %s" % (who, reason)
    if after is NodeCondition.DOWN:
        return "down: %s" % reason
    if before is NodeCondition.DOWN:
        return "back in service (slurmd answers again)"
    if owned_by_aiportal(before_reason):
        return "resumed by the health check after passing checks (was: %s)" % before_reason
    return "resumed" + (" (was: %s)" % before_reason if before_reason else "")


def record_node(db: Session, node: str, cond: NodeCondition, reason: str, settings: Settings | None = None,
                event: Event | None = None) -> bool:
    """Compare-and-set the node's record to (cond, reason); on a change add one node event
    (``event``, or one made here). The first sight of a node is recorded without an event.
    Returns whether this caller made the change. The caller commits."""
    reason = reason[:1024]
    now = utcnow()
    rec = db.get(NodeRecord, node)
    if rec is None:
        db.add(NodeRecord(name=node, condition=cond, reason=reason, since=now, updated_at=now))
        if event is not None:
            db.add(event)
        return event is not None
    if rec.condition is cond and rec.reason == reason:
        return False
    t = NodeRecord.__table__
    res = db.execute(t.update().where(t.c.name == node, t.c.condition == rec.condition, t.c.reason == rec.reason)
                     .values(condition=cond, reason=reason, since=now, updated_at=now))
    if res.rowcount != 1:
        return False
    before, before_reason = rec.condition, rec.reason
    db.expire(rec)
    if event is None:
        wanted = settings is not None and notify_wanted(settings, has_owner=False)
        event = Event(at=now, kind=_NODE_KIND[cond], node=node,
                      message=node_message(before, cond, reason, before_reason)[:2000],
                      notify_after=now if wanted else None)
    db.add(event)
    return True
