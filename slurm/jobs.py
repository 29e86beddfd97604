"""Job status records and the pure parsers of squeue/sacct output."""
from __future__ import annotations

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
