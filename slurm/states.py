"""Job states: Slurm's state strings become a :class:`JobState` once, here, through one table.

Nothing else in aiportal compares against ``"RUNNING"``. Unknown strings become ``UNKNOWN``
with a warning (Slurm adds states between releases).
"""
from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    SUBMITTING = "SUBMITTING"        #: stored by the portal, not yet accepted by Slurm
    PENDING = "PENDING"              #: queued, waiting for resources, a dependency or its begin time
    CONFIGURING = "CONFIGURING"      #: nodes allocated, being readied
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"        #: finished, processes being cleaned up
    COMPLETED = "COMPLETED"          #: exit code 0
    FAILED = "FAILED"                #: non-zero exit code or launch failure
    CANCELLED = "CANCELLED"          #: by the user or an admin
    TIMEOUT = "TIMEOUT"              #: hit its time limit
    NODE_FAIL = "NODE_FAIL"          #: a node of the job failed
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    REQUEUED = "REQUEUED"            #: being put back in the queue (requeue, node failure)
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    REVOKED = "REVOKED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    SIGNALING = "SIGNALING"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    UNKNOWN = "UNKNOWN"

    @property
    def terminal(self) -> bool:
        """The job will not run again (unless resubmitted)."""
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Queued or running in Slurm."""
        return not self.terminal and self not in (JobState.SUBMITTING, JobState.UNKNOWN)


TERMINAL = frozenset({
    JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.NODE_FAIL,
    JobState.PREEMPTED, JobState.OUT_OF_MEMORY, JobState.BOOT_FAIL, JobState.DEADLINE,
    JobState.REVOKED, JobState.SPECIAL_EXIT,
})

# squeue's long names, sacct's names and the short codes (%t) map to one state.
_TABLE: dict[str, JobState] = {s.value: s for s in JobState if s not in (JobState.SUBMITTING,)}
_TABLE.update({
    "PD": JobState.PENDING, "CF": JobState.CONFIGURING, "R": JobState.RUNNING, "S": JobState.SUSPENDED,
    "CG": JobState.COMPLETING, "CD": JobState.COMPLETED, "F": JobState.FAILED, "CA": JobState.CANCELLED,
    "TO": JobState.TIMEOUT, "NF": JobState.NODE_FAIL, "PR": JobState.PREEMPTED, "OOM": JobState.OUT_OF_MEMORY,
    "BF": JobState.BOOT_FAIL, "DL": JobState.DEADLINE, "RQ": JobState.REQUEUED, "RH": JobState.REQUEUE_HOLD,
    "RF": JobState.REQUEUE_FED, "RS": JobState.RESIZING, "RV": JobState.REVOKED, "SE": JobState.SPECIAL_EXIT,
    "SO": JobState.STAGE_OUT, "ST": JobState.STOPPED, "SI": JobState.SIGNALING, "RD": JobState.RESV_DEL_HOLD,
})


def parse_job_state(text: str) -> JobState:
    """``"CANCELLED by 3001"`` -> CANCELLED; ``"RUNNING"`` -> RUNNING; unknown -> UNKNOWN + warning."""
    word = text.strip().split(" ")[0].rstrip("+").upper() if text.strip() else ""
    state = _TABLE.get(word)
    if state is None:
        log.warning("unknown Slurm job state %r, treated as UNKNOWN", text)
        return JobState.UNKNOWN
    return state
