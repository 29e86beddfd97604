"""Drain and resume with ownership (pure): aiportal drains a failing node with a reason that
starts with :data:`DRAIN_PREFIX` (``aiportal:``), and resumes only nodes whose reason
:func:`owned_by_aiportal` says is its own, after their checks passed N times in a row. A node
drained with any other reason (an admin's) is never touched.

The one rule for "ours", used by the monitor, the recovery plan and the portal (which refuses an
admin's reason that would match it): the reason, less leading whitespace, starts with exactly
``aiportal:``. Case counts: Slurm stores a reason as typed and aiportal only ever writes the
lower-case prefix, so an admin's ``AIPORTAL: ...`` (typed with scontrol) stays the admin's and
is never resumed by the monitor. Leading whitespace does not count: aiportal never writes it
and output parsers (sinfo columns) strip it anyway, so it cannot tell an admin's reason apart.
One exception: Slurm's own "Duplicate jobid" drain (:data:`SLURM_PASSING`) is resumed too.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from slurm.cluster import NodeState

if TYPE_CHECKING:
    from monitor.checks import Verdict

#: what every drain reason aiportal writes starts with (``aiportal: <check>: <value> (limit <limit>)``)
DRAIN_PREFIX = "aiportal:"


#: drain reasons Slurm itself writes for a passing condition, resumed like aiportal's own once
#: the node's checks pass: "Duplicate jobid" (a controller restarted from older state gave out
#: again the id of a job still running on the node; the launch fails, the node is drained and
#: would stay so, taking a whole partition out of service, after that job has ended)
SLURM_PASSING = ("Duplicate jobid",)


def owned_by_aiportal(reason: str) -> bool:
    """Whether a node's Slurm drain ``reason`` is aiportal's own (and so aiportal's to resume)."""
    return reason.lstrip().startswith(DRAIN_PREFIX)


def resumable(reason: str) -> bool:
    """Whether the monitor resumes a node drained with ``reason`` once its checks pass: aiportal's
    own, or one of Slurm's :data:`SLURM_PASSING` reasons (as Slurm writes it)."""
    return owned_by_aiportal(reason) or reason.strip() in SLURM_PASSING


_DRAINED = frozenset({NodeState.DRAINING, NodeState.DRAINED})


class Action(enum.Enum):
    NONE = "none"
    DRAIN = "drain"
    RESUME = "resume"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str           #: the drain reason (DRAIN), else why nothing or a resume happens
    passes: int           #: consecutive passing runs after this one


def decide(state: NodeState | None, reason: str, verdicts: Sequence[Verdict], passes_before: int,
           resume_after: int) -> Decision:
    """What to do with a node in ``state`` (with its Slurm ``reason``) after a run."""
    failures = [v for v in verdicts if v.failed]
    drained = state in _DRAINED or (state is NodeState.DOWN and bool(reason))
    if failures:
        first = failures[0].reason()
        if state is None:
            return Decision(Action.NONE, "node state unknown (slurmctld unreachable?): not drained", 0)
        if drained and owned_by_aiportal(reason):
            return Decision(Action.NONE, "already drained by aiportal: %s" % reason, 0)
        if drained:
            return Decision(Action.NONE, "drained by someone else (%s): left alone" % reason, 0)
        return Decision(Action.DRAIN, first, 0)
    passes = passes_before + 1
    if drained and resumable(reason):
        if passes >= resume_after:
            return Decision(Action.RESUME, "checks passed %d times in a row (needed %d)" % (passes, resume_after), passes)
        return Decision(Action.NONE, "passed %d of %d times needed to resume" % (passes, resume_after), passes)
    if drained:
        return Decision(Action.NONE, "drained by someone else (%s): never resumed by aiportal" % reason, passes)
    return Decision(Action.NONE, "healthy", passes)
