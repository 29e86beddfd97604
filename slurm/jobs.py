"""Job status records and the pure parsers of squeue/sacct output."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from slurm.errors import SlurmParseError
from slurm.states import JobState, parse_job_state

SEP = "\x1f"
# squeue -h --array -O with these fields, each ``NAME:0`` + SEP (see :func:`squeue_format`): the
# one squeue call per cycle of the reconciler (``queue``) and of the health monitor
# (``recovery_jobs``). Long field names, because the -o letters have no restart count, requeue
# flag or begin time. JobArrayID is ``%i`` (``ID`` or ``ID_N``); -O's JobID is an array task's
# own job id, or the array's for every task not started yet. Dependency is what the job waits on,
# each with its state (``afterok:655(failed),afterany:656(unfulfilled)``; ``?`` between them: any).
# Partition and tres-alloc (``cpu=1,mem=2000M,node=1,billing=1,gres/gpu=2,gres/gpu:p40=2``: what it
# has, or asks for while pending, over all its nodes) say a plain sbatch job's partition and GPUs.
SQUEUE_FIELDS = ("JobArrayID", "StateCompact", "Reason", "NodeList", "RestartCnt", "Requeue", "UserName",
                 "Comment", "EligibleTime", "Name", "StdOut", "Dependency", "SubmitTime", "StartTime", "Partition",
                 "tres-alloc")
# sacct -n -X -P --delimiter SEP -o FIELDS (sacct has no restart count: see parse_sacct)
SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "User", "Comment", "Reason", "JobName", "Submit", "Start",
                "End")


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
    #: how often Slurm has requeued it (squeue's RestartCnt; 0: first run); None where the
    #: source does not say (sacct, backends without it)
    restarts: int | None = None
    #: the --output path as squeue shows it (patterns like %x not expanded: expand_output_path)
    stdout: str = ""
    #: what it waits on, as squeue shows it (``afterok:655(failed)``; see failed_dependencies); "" for none
    dependency: str = ""
    #: when Slurm accepted it: with the comment, what tells this job from a later one that got
    #: the same id after a controller restart forgot it (None where the source does not say)
    submitted: dt.datetime | None = None
    #: when this run started (None: not yet, or not said; squeue's estimate for a pending job is dropped)
    started: dt.datetime | None = None
    #: when it ended (sacct only)
    ended: dt.datetime | None = None
    #: its partition and GPUs in all (squeue only; "" and None where the source does not say)
    partition: str = ""
    gpus: int | None = None

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "state": self.state.value, "reason": self.reason,
                "nodes": self.nodes, "exit_code": self.exit_code, "signal": self.signal,
                "user": self.user, "comment": self.comment, "name": self.name}


def _clean(text: str) -> str:
    text = text.strip()
    return "" if text in ("(null)", "None", "(None)", "None assigned") else text


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


def parse_sacct_runs(text: str) -> list[JobStatus]:
    """Every record, in sacct's order (``-X``: one per run of a job; with ``--duplicates`` also
    those of older jobs that had the same id, told apart by comment and submit time).

    sacct has no restart count (no RestartCnt field; counting runs with ``--duplicates`` would
    also count older jobs whose id Slurm reused): ``restarts`` stays None here."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if len(cols) != len(SACCT_FIELDS):
            raise SlurmParseError(line, "expected %d sacct fields, got %d" % (len(SACCT_FIELDS), len(cols)))
        jid, state, exit_code, nodes, user, comment, reason, name, submit, start, end = (c.strip() for c in cols)
        code, sig = parse_exit_code(exit_code)
        st = parse_job_state(state)
        # a completed job's Reason is the last one it waited for (Dependency, Priority): not news
        out.append(JobStatus(jid, st, "" if st is JobState.COMPLETED else _clean(reason), _clean(nodes), code, sig,
                             user, _clean(comment), name, submitted=slurm_time(submit), started=slurm_time(start),
                             ended=slurm_time(end)))
    return out


def parse_sacct(text: str) -> dict[str, JobStatus]:
    """One record per job id: a requeued job appears once per run, the last one wins."""
    return {r.job_id: r for r in parse_sacct_runs(text)}


def squeue_format() -> str:
    """``--Format`` of :data:`SQUEUE_FIELDS`: ``:0`` pads nothing and truncates nothing, and SEP
    after each field keeps values with spaces (reasons, names) whole."""
    return ",".join("%s:0%s" % (f, SEP) for f in SQUEUE_FIELDS)


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
    name: str = ""


def slurm_time(text: str) -> dt.datetime | None:
    """Slurm's local ``YYYY-MM-DDTHH:MM:SS`` (or N/A, Unknown, None) as an aware datetime."""
    text = text.strip()
    try:
        return dt.datetime.fromisoformat(text).astimezone() if text[:1].isdigit() else None
    except ValueError:
        return None


class _SqueueRow(NamedTuple):
    job_id: str
    state: JobState
    reason: str
    nodes: str
    restarts: int
    requeue: bool
    user: str
    comment: str
    eligible: str       #: as Slurm printed it (only the monitor needs it as a time)
    name: str
    stdout: str
    dependency: str
    submitted: dt.datetime | None
    started: dt.datetime | None
    partition: str
    gpus: int


_TRES_GPUS = re.compile(r"(?:^|,)gres/gpu=([0-9]+)(?:,|$)")


def tres_gpus(tres: str) -> int:
    """GPUs in a TRES list (``...,gres/gpu=4,gres/gpu:p40=4``); 0 where it names none."""
    m = _TRES_GPUS.search(tres or "")
    return int(m.group(1)) if m else 0


def _squeue_rows(text: str) -> Iterator[_SqueueRow]:
    """The one parser of ``squeue -h --array -O`` + :func:`squeue_format` (each line ends with
    SEP), a row per job or array task."""
    n_fields = len(SQUEUE_FIELDS)
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if cols and cols[-1].strip() == "":
            cols = cols[:-1]
        if len(cols) != n_fields:
            raise SlurmParseError(line, "expected %d squeue fields (%s), got %d: run squeue with --Format "
                                  "slurm.jobs.squeue_format()" % (n_fields, ",".join(SQUEUE_FIELDS), len(cols)))
        jid, state, reason, nodes, restarts, requeue, user, comment, eligible, name, stdout, dependency, submit, \
            start, partition, tres = (c.strip() for c in cols)
        try:
            n = int(restarts or 0)
        except ValueError as e:
            raise SlurmParseError(line, "restart count %r is not a number" % restarts) from e
        st = parse_job_state(state)
        yield _SqueueRow(jid, st, _clean(reason), _clean(nodes), n,
                         requeue not in ("0", "no", "No"), user, _clean(comment), eligible, name, _clean(stdout),
                         _clean(dependency), slurm_time(submit),
                         # a pending job's StartTime is Slurm's estimate, not a start
                         None if st in (JobState.PENDING, JobState.REQUEUED, JobState.REQUEUE_HOLD) else slurm_time(start),
                         _clean(partition), tres_gpus(tres))


def parse_squeue(text: str) -> dict[str, JobStatus]:
    """squeue's answer as job statuses (with Slurm's restart count), by job id (``ID_N`` for an
    array task)."""
    return {r.job_id: JobStatus(r.job_id, r.state, r.reason, r.nodes, user=r.user, comment=r.comment, name=r.name,
                                restarts=r.restarts, stdout=r.stdout, dependency=r.dependency, submitted=r.submitted,
                                started=r.started, partition=r.partition, gpus=r.gpus)
            for r in _squeue_rows(text)}


def parse_squeue_recovery(text: str) -> dict[str, QueuedJob]:
    """squeue's answer as the health monitor needs it (requeue flag, begin time), by job id."""
    return {r.job_id: QueuedJob(r.job_id, r.state, r.reason, r.nodes, r.restarts, r.requeue, r.user, r.comment,
                                slurm_time(r.eligible), r.name)
            for r in _squeue_rows(text)}


#: one dependency as squeue shows it: TYPE:JOB[_TASK|_*][+MINUTES][:JOB...](STATE), or singleton(STATE)
_DEPENDENCY = re.compile(r"(?P<type>[a-z_]+)(?P<jobs>(?::[0-9]+(?:_(?:[0-9]+|\*))?(?:\+[0-9]+)?)*)\((?P<state>[a-z_]+)\)")


def failed_dependencies(dependency: str) -> tuple[str, ...]:
    """The jobs whose end means a job can never start, from squeue's Dependency field: those
    marked ``(failed)`` where all must hold (``,``), or all of them where any one would do
    (``?``) and every one failed; () while it can still start. Array jobs by their id (``655``).

    >>> failed_dependencies("afterok:655(failed),afterany:656(unfulfilled)")
    ('655',)
    """
    text = _clean(dependency)
    parts = [p.strip() for p in re.split(r"[,?]", text) if p.strip()]
    failed = [m for m in (_DEPENDENCY.fullmatch(p) for p in parts) if m and m.group("state") == "failed"]
    if "?" in text and len(failed) != len(parts):
        return ()
    out: list[str] = []
    for m in failed:
        for job in m.group("jobs").split(":")[1:]:
            base = re.split(r"[_+]", job, maxsplit=1)[0]
            if base not in out:
                out.append(base)
    return tuple(out)


_OUTPUT_PATTERN = re.compile(r"%(\d*)([%AajJNnstux])|%")


def expand_output_path(pattern: str, job_id: str, name: str = "", user: str = "", nodes: str = "") -> str | None:
    """An sbatch ``--output`` path with its replacement symbols filled in, as Slurm does for
    the batch step (``%j`` job id, ``%A``/``%a`` array job and task, ``%x`` name, ``%u`` user,
    ``%N`` first node, ``%n``/``%t`` 0, ``%s`` batch, ``%%``; a number pads with zeros:
    ``%4a``). ``job_id`` is ``ID`` or ``ID_N``. None for a symbol that cannot be filled in
    here (an array task's own ``%j``, which squeue does not show, or one Slurm does not know)."""
    base, _, task = job_id.partition("_")
    values = {"%": "%", "A": base, "a": task or "4294967294", "j": None if task else base,
              "J": None if task else base, "N": nodes.split(",")[0], "n": "0", "s": "batch", "t": "0", "u": user,
              "x": name}
    missing = []

    def fill(m: re.Match) -> str:
        value = values.get(m.group(2)) if m.group(2) else None
        if value is None:
            missing.append(m.group(0))
            return ""
        width = int(m.group(1) or 0)
        return value.zfill(width) if width and value.isdigit() else value
    out = _OUTPUT_PATTERN.sub(fill, pattern)
    return None if missing or not out else out
