"""Recovery of jobs hit by node failures, as a pure plan from one look at Slurm.

From the nodes (sinfo) and the queue (one ``squeue`` with restart counts), :func:`plan` says:

- which node conditions to record (UP / DRAIN with reason / DOWN): a change is a node event;
- which requeued jobs to **release** at once: Slurm holds a requeued job back with a begin time
  about two minutes ahead; a PENDING job with a restart count and a begin time ahead by at most
  ``release_within_s`` is that hold (a user's own ``--begin`` further ahead is left alone);
- which running jobs to **requeue**: those on a node aiportal drained for a hard failure (a
  check after which running jobs cannot finish, :data:`monitor.checks.HARD_CHECKS`);
- which of those to **stop** instead: jobs that opted out of requeue get SIGTERM in their batch
  shell, which passes it to the program and stages the outputs out (slurm/render.py);
- which requeues happened (a restart count went up, by Slurm's JobRequeue when a node went
  down, by us, or by an admin), and which no-requeue jobs vanished with a node that went down:
  each becomes one job event, keyed so that it is recorded once.

Nodes an admin drained (any reason :func:`monitor.ownership.owned_by_aiportal` does not claim) are
never acted on.
"""
from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from monitor.checks import is_hard_failure
from monitor.errors import ParseError
from monitor.ownership import owned_by_aiportal
from monitor.parse import expand_hostlist
from slurm.cluster import Node, NodeState
from slurm.jobs import QueuedJob
from slurm.states import JobState


class NodeCondition(enum.Enum):
    """What a node looks like to the monitor; a change is a node event."""

    UP = "UP"          #: in service (idle, mixed, allocated, ...)
    DRAIN = "DRAIN"    #: draining or drained (the reason says by whom)
    DOWN = "DOWN"      #: Slurm declared it down (slurmd not responding, failed)


_DOWN = frozenset({NodeState.DOWN, NodeState.FAIL, NodeState.FAILING})
_DRAIN = frozenset({NodeState.DRAINING, NodeState.DRAINED})
_RUNNING = frozenset({JobState.RUNNING, JobState.CONFIGURING})


def condition_of(node: Node) -> tuple[NodeCondition, str]:
    if node.state in _DOWN:
        return NodeCondition.DOWN, node.reason or "not responding"
    if node.state in _DRAIN:
        return NodeCondition.DRAIN, node.reason
    return NodeCondition.UP, ""


def nodes_of(job: QueuedJob) -> list[str]:
    if not job.nodes:
        return []
    try:
        return expand_hostlist(job.nodes)
    except ParseError:
        return [job.nodes]


@dataclass(frozen=True)
class JobAction:
    job: QueuedJob
    node: str
    why: str

    @property
    def key(self) -> str:
        """One action per job run: ``requeue:ID:RUN`` (RUN = restarts before it)."""
        return "%s:%s:%d" % ("requeue" if self.job.requeue else "stop", self.job.job_id, self.job.restarts)


@dataclass(frozen=True)
class JobNote:
    """Something that happened to a job, to record once as an event under ``key``."""

    job_id: str
    user: str
    comment: str
    kind: str            #: "requeued", or "node_failed" (stopped or ended with its node)
    key: str
    message: str
    node: str | None
    restarts: int


@dataclass
class Memory:
    """What earlier cycles saw: the node each running job was on, and whether it may be
    requeued (to say why a job was requeued, and to notice no-requeue jobs that died with it)."""

    #: job id -> (node, may be requeued, user)
    last_node: dict[str, tuple[str, bool, str]] = field(default_factory=dict)
    #: job id -> cycles in a row a requeueable job was missing from squeue's answer
    missing: dict[str, int] = field(default_factory=dict)


#: cycles a requeueable job may be missing from squeue's answer before its node is forgotten: while
#: Slurm requeues it, it passes through a state squeue's default list leaves out, and a requeue
#: noted then would not say which node it left
FORGET_AFTER = 20


@dataclass
class Plan:
    conditions: dict[str, tuple[NodeCondition, str]] = field(default_factory=dict)
    release: list[QueuedJob] = field(default_factory=list)
    requeue: list[JobAction] = field(default_factory=list)
    stop: list[JobAction] = field(default_factory=list)
    notes: list[JobNote] = field(default_factory=list)


def requeue_key(job_id: str, run: int) -> str:
    return "requeue:%s:%d" % (job_id, run)


def _cause(node: str | None, conditions: Mapping[str, tuple[NodeCondition, str]]) -> str:
    if not node or node not in conditions:
        return ""
    cond, reason = conditions[node]
    if cond is NodeCondition.DOWN:
        return "node %s went down (%s)" % (node, reason)
    if cond is NodeCondition.DRAIN and owned_by_aiportal(reason):
        return "node %s failed its health check (%s)" % (node, reason)
    if cond is NodeCondition.DRAIN:
        return "node %s was drained (%s)" % (node, reason)
    return ""


#: Slurm's reason for a job requeued and held because its launch failed on a node
LAUNCH_FAILED_HELD = "launch failed requeued held"


def plan(nodes: Iterable[Node], jobs: Mapping[str, QueuedJob], memory: Memory, now: dt.datetime,
         release_within_s: float = 300.0) -> Plan:
    """Pure: what to do this cycle. Updates ``memory`` with where jobs run now."""
    out = Plan()
    for n in nodes:
        out.conditions[n.name] = condition_of(n)
    hard = {name for name, (cond, reason) in out.conditions.items()
            if cond is NodeCondition.DRAIN and owned_by_aiportal(reason) and is_hard_failure(reason)}
    for jid, job in jobs.items():
        if job.state in _RUNNING:
            failed = [n for n in nodes_of(job) if n in hard]
            if failed:
                node = failed[0]
                why = "node %s failed its health check (%s)" % (node, out.conditions[node][1])
                (out.requeue if job.requeue else out.stop).append(JobAction(job, node, why))
        # the hold shows as a begin time ahead (the reason says BeginTime only once the scheduler looked)
        ahead = None if job.eligible is None else (job.eligible - now).total_seconds()
        released = job.state is JobState.PENDING and job.restarts > 0 and (
            (ahead is not None and 0 < ahead <= release_within_s) or (ahead is None and job.reason == "BeginTime")
            # its launch failed on a node, which Slurm drained for it (e.g. "Duplicate jobid" after a
            # controller restart): Slurm holds it for an admin; it can start on another node
            or job.reason == LAUNCH_FAILED_HELD)
        if released:
            out.release.append(job)
        if job.restarts > 0:
            last = memory.last_node.get(jid, (None, True, ""))[0]
            cause = _cause(last, out.conditions)
            out.notes.append(JobNote(
                jid, job.user, job.comment, "requeued", requeue_key(jid, job.restarts - 1),
                "requeued%s; run %d%s" % ((": " + cause) if cause else "", job.restarts + 1,
                                          " released from Slurm's requeue hold to start at once" if released else ""),
                last, job.restarts))
    # no-requeue jobs that vanished with a node that went down: Slurm ended them NODE_FAIL
    for jid, (node, requeue, user) in list(memory.last_node.items()):
        if jid in jobs:
            memory.missing.pop(jid, None)
            continue
        if requeue:
            memory.missing[jid] = memory.missing.get(jid, 0) + 1
            if memory.missing[jid] >= FORGET_AFTER:
                del memory.last_node[jid]
                del memory.missing[jid]
            continue
        del memory.last_node[jid]
        cond = out.conditions.get(node, (NodeCondition.UP, ""))
        if cond[0] is NodeCondition.DOWN:
            out.notes.append(JobNote(jid, user, "", "node_failed", "nodefail:%s" % jid,
                                     "ended with its node: %s; it opted out of requeue (--no-requeue), so Slurm "
                                     "ended it NODE_FAIL" % _cause(node, out.conditions), node, 0))
        elif node in hard:
            # whichever monitor sent the SIGTERM, the stop is recorded once (same key as the action's)
            out.notes.append(JobNote(jid, user, "", "node_failed", "stop:%s:0" % jid,
                                     "stopped: %s; it opted out of requeue, so its batch script got SIGTERM, "
                                     "stopped the program and staged its outputs out" % _cause(node, out.conditions),
                                     node, 0))
    for jid, job in jobs.items():
        if job.state in _RUNNING and job.nodes:
            memory.last_node[jid] = (nodes_of(job)[0], job.requeue, job.user)
    return out


