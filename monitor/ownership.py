"""Drain and resume with ownership (pure): aiportal drains a failing node with a reason that
starts with ``aiportal:``, and resumes only nodes whose reason starts so, after their checks
passed N times in a row. A node drained with any other reason (an admin's) is never touched.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from monitor.checks import REASON_PREFIX, Verdict
from slurm.cluster import NodeState

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


def owned(reason: str) -> bool:
    """Drained by aiportal (and so aiportal's to resume)."""
    return reason.strip().startswith(REASON_PREFIX)


def decide(state: NodeState | None, reason: str, verdicts: Sequence[Verdict], passes_before: int,
           resume_after: int) -> Decision:
    """What to do with a node in ``state`` (with its Slurm ``reason``) after a run."""
    failures = [v for v in verdicts if v.failed]
    drained = state in _DRAINED or (state is NodeState.DOWN and bool(reason))
    if failures:
        first = failures[0].reason()
        if state is None:
            return Decision(Action.NONE, "node state unknown (slurmctld unreachable?): not drained", 0)
        if drained and owned(reason):
            return Decision(Action.NONE, "already drained by aiportal: %s" % reason, 0)
        if drained:
            return Decision(Action.NONE, "drained by someone else (%s): left alone" % reason, 0)
        return Decision(Action.DRAIN, first, 0)
    passes = passes_before + 1
    if drained and owned(reason):
        if passes >= resume_after:
            return Decision(Action.RESUME, "checks passed %d times in a row (needed %d)" % (passes, resume_after), passes)
        return Decision(Action.NONE, "passed %d of %d times needed to resume" % (passes, resume_after), passes)
    if drained:
        return Decision(Action.NONE, "drained by someone else (%s): never resumed by aiportal" % reason, passes)
    return Decision(Action.NONE, "healthy", passes)
