"""Job status records and the pure parsers of squeue/sacct output."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from slurm.errors import SlurmParseError
from slurm.states import JobState, parse_job_state

SEP = "\x1f"
# squeue -h -r -o FORMAT (all jobs, array tasks one per line)
SQUEUE_FIELDS = ("%i", "%T", "%r", "%N", "%u", "%k", "%j")
# sacct -n -X -P --delimiter SEP -o FIELDS
SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "User", "Comment", "Reason", "JobName")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: JobState
    reason: str = ""
    nodes: str = ""
    exit_code: int | None = None
    signal: int | None = None
    user: str = ""
    comment: str = ""
    name: str = ""

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "state": self.state.value, "reason": self.reason,
                "nodes": self.nodes, "exit_code": self.exit_code, "signal": self.signal,
                "user": self.user, "comment": self.comment, "name": self.name}


def _clean(text: str) -> str:
    text = text.strip()
    return "" if text in ("(null)", "None", "(None)", "None assigned") else text


def parse_squeue(text: str) -> dict[str, JobStatus]:
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if len(cols) != len(SQUEUE_FIELDS):
            raise SlurmParseError(line, "expected %d squeue fields, got %d" % (len(SQUEUE_FIELDS), len(cols)))
        jid, state, reason, nodes, user, comment, name = (c.strip() for c in cols)
        out[jid] = JobStatus(jid, parse_job_state(state), _clean(reason), _clean(nodes), user=user,
                             comment=_clean(comment), name=name)
    return out


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` is ``code:signal``: ``"1:0"`` -> (1, 0)."""
    text = text.strip()
    if not text:
        return None, None
    code, _, sig = text.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError as e:
        raise SlurmParseError(text, "exit code is not CODE:SIGNAL") from e


def parse_sacct(text: str) -> dict[str, JobStatus]:
    """One record per job (``-X``); a requeued job appears once per run: the last one wins."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if len(cols) != len(SACCT_FIELDS):
            raise SlurmParseError(line, "expected %d sacct fields, got %d" % (len(SACCT_FIELDS), len(cols)))
        jid, state, exit_code, nodes, user, comment, reason, name = (c.strip() for c in cols)
        code, sig = parse_exit_code(exit_code)
        out[jid] = JobStatus(jid, parse_job_state(state), _clean(reason), _clean(nodes), code, sig,
                             user, _clean(comment), name)
    return out


# squeue -h --array -O with these fields, each ``NAME:0`` + SEP (the monitor's one call per cycle:
# restart counts, the requeue flag and the begin time are not in the -o format letters)
RECOVERY_FIELDS = ("JobID", "StateCompact", "Reason", "NodeList", "RestartCnt", "Requeue", "UserName",
                   "Comment", "EligibleTime")


def recovery_format() -> str:
    return ",".join("%s:0%s" % (f, SEP) for f in RECOVERY_FIELDS)


@dataclass(frozen=True)
class QueuedJob:
    """A job Slurm holds, as the health monitor needs it."""

    job_id: str
    state: JobState
    reason: str = ""
    nodes: str = ""
    #: how often Slurm has requeued it (0: first run)
    restarts: int = 0
    #: Slurm may requeue it (``--requeue``, or JobRequeue=1 without ``--no-requeue``)
    requeue: bool = True
    user: str = ""
    comment: str = ""
    #: when it may start (a requeued job is held about two minutes ahead); None if unknown
    eligible: dt.datetime | None = None


def _slurm_time(text: str) -> dt.datetime | None:
    """Slurm's local ``YYYY-MM-DDTHH:MM:SS`` (or N/A, Unknown, None) as an aware datetime."""
    text = text.strip()
    try:
        return dt.datetime.fromisoformat(text).astimezone() if text[:1].isdigit() else None
    except ValueError:
        return None


def parse_squeue_recovery(text: str) -> dict[str, QueuedJob]:
    """Parse ``squeue -h --array -O`` + :func:`recovery_format` (each line ends with SEP)."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if cols and cols[-1].strip() == "":
            cols = cols[:-1]
        if len(cols) != len(RECOVERY_FIELDS):
            raise SlurmParseError(line, "expected %d squeue fields, got %d" % (len(RECOVERY_FIELDS), len(cols)))
        jid, state, reason, nodes, restarts, requeue, user, comment, eligible = (c.strip() for c in cols)
        try:
            n = int(restarts or 0)
        except ValueError as e:
            raise SlurmParseError(line, "restart count %r is not a number" % restarts) from e
        out[jid] = QueuedJob(jid, parse_job_state(state), _clean(reason), _clean(nodes), n,
                             requeue.strip() not in ("0", "no", "No"), user, _clean(comment), _slurm_time(eligible))
    return out
