"""The reconciler keeps the database in step with Slurm.

One cycle: read the jobs that are not over from the database, ask Slurm once for every job it
holds (``squeue``, all users), and ask accounting once (``sacct``) only for the jobs that left
the queue; never one call per job. Then, from the pure :func:`plan`:

- record state changes (pending with reason, running on node, requeued, finished with exit
  code) on the job and as events on its timeline. Restarts are Slurm's own count (squeue's
  RestartCnt): each rise is one requeue event, whether or not a cycle saw the job pending in
  between (a requeued job whose hold is cleared at once may be running again by the next cycle);
- adopt jobs stored as ``SUBMITTING`` whose Slurm job carries their uuid in its comment (the
  portal died between ``sbatch`` and storing the id: no duplicate), and submit again those
  Slurm never got once ``submit_grace_s`` has passed (no loss);
- add jobs that users submitted with plain ``sbatch`` under their Unix account, as external;
- end jobs that can never start (Slurm's DependencyNeverSatisfied: a job they depend on, e.g. the
  conversion of their image, ended without success): cancelled in Slurm at once and recorded
  FAILED with the reason in words, for a conversion its own error (:mod:`portal.services.conversions`);
- then run the inference services' controller step on the same squeue answer
  (:class:`portal.daemons.controller.ServiceController`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from sqlalchemy import func
from sqlmodel import Session, select

from portal.daemons.loop import run_loop
from portal.models import Event, EventKind, ImageBuild, Job, Service, ServiceReplica, User, utcnow
from portal.models.jobs import reason_sentence
from portal.services.conversions import dependency_reason
from portal.services.jobs import CONTROLLER_DOWN
from portal.services.job_data import finish_job_data
from slurm.errors import SlurmError
from slurm.jobs import JobStatus, failed_dependencies
from slurm.reasons import dependency_failed, explain
from slurm.render import COMMENT_PREFIX, fence_done
from slurm.spec import NodeType
from slurm.states import TERMINAL, JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observed:
    """What Slurm says about one portal job (an array job's tasks folded into one)."""

    state: JobState
    reason: str = ""
    nodes: str = ""
    exit_code: int | None = None
    signal: int | None = None
    #: Slurm's restart count (an array's: its tasks' together); None where Slurm did not say
    restarts: int | None = None
    #: what it waits on, as squeue shows it (``afterok:655(failed)``)
    dependency: str = ""
    #: Slurm's own times of this run (None where not said)
    started: dt.datetime | None = None
    ended: dt.datetime | None = None


@dataclass(frozen=True)
class Doomed:
    """A job that can never start: a job it depends on ended without success."""

    failed: tuple[str, ...]     #: the Slurm jobs that failed it, as far as squeue says (may be empty)
    live: bool                  #: still in Slurm's queue, waiting: to be cancelled


@dataclass
class Plan:
    updates: dict[str, Observed] = field(default_factory=dict)      #: portal job id -> new status
    adopt: dict[str, str] = field(default_factory=dict)             #: portal job id -> Slurm id
    resubmit: list[str] = field(default_factory=list)               #: portal job ids
    #: Slurm forgot them: another job holds their id now
    forgotten: list[str] = field(default_factory=list)
    #: no record of them anywhere: forgotten if the controller restarted since they were accepted
    unseen: list[str] = field(default_factory=list)
    doomed: dict[str, Doomed] = field(default_factory=dict)         #: portal job id -> why it can never start


_RUN_ORDER = [JobState.RUNNING, JobState.COMPLETING, JobState.CONFIGURING, JobState.STAGE_OUT,
              JobState.SUSPENDED, JobState.REQUEUED, JobState.REQUEUE_HOLD, JobState.PENDING]


def restarts_of(tasks: Iterable[JobStatus]) -> int | None:
    """Slurm's restart count of a job from its records: an array's is the sum of its tasks'
    (each task's requeue is one restart of the job); None if a record does not say."""
    total = 0
    for t in tasks:
        if t.restarts is None:
            return None
        total += t.restarts
    return total


def fold(tasks: Iterable[JobStatus]) -> Observed | None:
    """One status for a job from its records (one, or an array's tasks): running while any task
    runs, pending while any waits, else finished: COMPLETED only when every task completed."""
    tasks = list(tasks)
    if not tasks:
        return None
    if len(tasks) == 1:
        t = tasks[0]
        return Observed(t.state, t.reason, t.nodes, t.exit_code, t.signal, t.restarts, t.dependency, t.started,
                        t.ended)
    nodes = ",".join(sorted({t.nodes for t in tasks if t.nodes}))
    restarts = restarts_of(tasks)
    starts = [t.started for t in tasks if t.started]
    started = min(starts) if starts else None
    for state in _RUN_ORDER:
        hit = [t for t in tasks if t.state is state]
        if hit:
            return Observed(state, hit[0].reason, nodes, restarts=restarts, dependency=hit[0].dependency,
                            started=started)
    live = [t for t in tasks if not t.state.terminal]
    if live:
        return Observed(live[0].state, live[0].reason, nodes, restarts=restarts, dependency=live[0].dependency,
                        started=started)
    ends = [t.ended for t in tasks]
    ended = max(ends) if all(ends) else None
    bad = [t for t in tasks if t.state is not JobState.COMPLETED]
    if not bad:
        return Observed(JobState.COMPLETED, "", nodes, 0, 0, restarts, started=started, ended=ended)
    first = sorted(bad, key=lambda t: t.job_id)[0]
    return Observed(first.state, "%d of %d tasks did not complete (first: %s %s)"
                    % (len(bad), len(tasks), first.job_id, first.state.value), nodes, first.exit_code, first.signal,
                    restarts, started=started, ended=ended)


def restarted(job: Job, obs: Observed) -> bool:
    """Slurm counts more restarts than the job has recorded (each rise is one requeue event)."""
    return obs.restarts is not None and obs.restarts > job.restarts


class Records:
    """A squeue/sacct answer indexed for lookups by job id: the job itself, or an array's tasks
    (``ID_N``) under ``ID``; several records per id where accounting keeps each run of a
    requeued job and older jobs Slurm gave the same id. Built once per cycle: lookups stay O(1)
    with thousands of jobs."""

    def __init__(self, table: Mapping[str, JobStatus] | Iterable[JobStatus]):
        rows = table.items() if isinstance(table, Mapping) else ((r.job_id, r) for r in table)
        self.runs: dict[str, list[JobStatus]] = {}      #: id or ID_N -> its records, oldest first
        self.tasks: dict[str, list[str]] = {}           #: array id -> its tasks' keys
        for key, status in rows:
            if key not in self.runs:
                base, sep, index = key.partition("_")
                if sep and "[" not in index:
                    self.tasks.setdefault(base, []).append(key)
            self.runs.setdefault(key, []).append(status)

    def all(self) -> list[JobStatus]:
        return [r for recs in self.runs.values() for r in recs]

    def _keys(self, slurm_id: str) -> list[str]:
        return self.tasks.get(slurm_id) or ([slurm_id] if slurm_id in self.runs else [])

    def of(self, slurm_id: str, mine=None) -> list[JobStatus]:
        """The job's records, the latest per task; only those ``mine(record)`` accepts."""
        out = []
        for key in self._keys(slurm_id):
            recs = [r for r in self.runs[key] if mine is None or mine(r)]
            if recs:
                out.append(recs[-1])
        return out

    def others(self, slurm_id: str, mine) -> bool:
        """Some record of this id belongs to another job (Slurm handed the id out again)."""
        return any(not mine(r) for key in self._keys(slurm_id) for r in self.runs[key])


def records_of(slurm_id: str, table: Mapping[str, JobStatus] | Records) -> list[JobStatus]:
    """A job's records in a squeue/sacct table: the job itself, or its array tasks."""
    return (table if isinstance(table, Records) else Records(table)).of(slurm_id)


def identity(job: Job):
    """Which Slurm records are this job's, not a later job's that got the same id after a
    controller restart forgot this one: a portal job's carry its uuid in the comment; a plain
    sbatch job's were submitted no later than the portal first saw it (Slurm's submit time)."""
    if not job.external:
        comment = COMMENT_PREFIX + job.id
        return lambda r: r.comment == comment
    seen = job.submitted_at
    if seen is None:
        return lambda r: True
    seen = seen if seen.tzinfo else seen.replace(tzinfo=dt.timezone.utc)
    limit = seen + dt.timedelta(seconds=1)
    return lambda r: r.submitted is None or r.submitted <= limit


NEVER_SATISFIED = "DependencyNeverSatisfied"



def doomed(obs: Observed) -> Doomed | None:
    """Whether a job can never start because a job it depends on ended without success: squeue
    marks that dependency ``(failed)``, or Slurm's reason is DependencyNeverSatisfied (a job
    Slurm, or another reconciler, already cancelled for it: ``live`` False). None otherwise."""
    failed = failed_dependencies(obs.dependency)
    if not (failed or explain(obs.reason).code == NEVER_SATISFIED):
        return None
    if obs.state is JobState.PENDING:
        return Doomed(failed, live=True)
    if obs.state is JobState.CANCELLED:
        return Doomed(failed, live=False)
    return None


def _ended_record(records: list[JobStatus]) -> JobStatus | None:
    """How a job ended, from its records (an array: its first task that did not complete); None
    while it has not ended or where nothing is known."""
    ended = [r for r in records if r.state.terminal]
    if not ended or len(ended) != len(records):
        return None
    bad = sorted((r for r in ended if r.state is not JobState.COMPLETED), key=lambda r: r.job_id)
    return bad[0] if bad else ended[0]


def portal_id_of(status: JobStatus) -> str | None:
    c = status.comment
    return c[len(COMMENT_PREFIX):] if c.startswith(COMMENT_PREFIX) and len(c) == len(COMMENT_PREFIX) + 36 else None


def final(obs: Observed) -> bool:
    """An accounting record that tells how a run ended: a terminal state, and an end time where
    it started (slurmdbd catching up after an outage writes a record's state before its end and
    exit code)."""
    return obs.state.terminal and not (obs.started is not None and obs.ended is None)


#: the comment of the portal's own Slurm jobs that it cannot match to a row: a stage-out being
#: finished (image conversions run as the builder account, never a portal user's)
_STAGE_OUT = COMMENT_PREFIX + "stage-out"
#: comments of rows the portal removes once their job is over (a deleted service's replicas, a
#: build): a finished record with one of them is not adopted (Slurm shows it for MinJobAge)
_REMOVED_ROWS = (COMMENT_PREFIX + "service:", COMMENT_PREFIX + "build:")
_BUILD_ID = re.compile(r"[0-9]{1,18}")


def claimed_comments(queue: Mapping[str, JobStatus]) -> dict[str, set[tuple[str, str]]]:
    """Pure: what the queue's ``aiportal:`` comments claim to be, to look up: kind ("job",
    "service", "build") -> {(its id, the Slurm user)}."""
    out: dict[str, set[tuple[str, str]]] = {"job": set(), "service": set(), "build": set()}
    for st in queue.values():
        c = st.comment
        if portal_id_of(st):
            out["job"].add((c[len(COMMENT_PREFIX):], st.user))
        elif c.startswith(COMMENT_PREFIX + "service:"):
            out["service"].add((c[len(COMMENT_PREFIX + "service:"):], st.user))
        elif c.startswith(COMMENT_PREFIX + "build:"):
            out["build"].add((c[len(COMMENT_PREFIX + "build:"):], st.user))
    return out


def external_candidates(queue: Mapping[str, JobStatus], known_slurm_ids: set[str],
                        unix_users: set[str], own_comments: set[tuple[str, str]] = frozenset()
                        ) -> dict[str, list[JobStatus]]:
    """Jobs in the queue that users submitted with plain ``sbatch`` and the portal does not
    know yet: Slurm id -> its records (an array's tasks). A job is the portal's own when its
    comment is one the portal wrote for that user (``own_comments``: (comment, Unix account),
    checked against the jobs, replicas and builds it stored) or one it cannot match to a row
    (a stage-out being finished); any other comment, ``aiportal:`` or not, hides nothing while
    the job waits or runs: a printed script submitted with plain sbatch, or
    ``--comment=aiportal:x``, shows up as external. A finished record that claims a replica or a
    build is not adopted: their rows go when a service is deleted, while Slurm still shows
    their jobs for a while."""
    out: dict[str, list[JobStatus]] = {}
    for jid, st in sorted(queue.items()):
        base = jid.split("_")[0]
        if base in known_slurm_ids or st.user not in unix_users:
            continue
        if (st.comment, st.user) in own_comments or st.comment == _STAGE_OUT:
            continue
        if st.state.terminal and st.comment.startswith(_REMOVED_ROWS):
            continue    # a replica or build whose row went (one seen while it ran was adopted then)
        out.setdefault(base, []).append(st)
    return out


def plan(jobs: list[Job], queue: Mapping[str, JobStatus], accounting: Mapping[str, JobStatus] | Iterable[JobStatus],
         known_slurm_ids: set[str], unix_users: set[str], now: dt.datetime, submit_grace_s: float,
         accounting_ok: bool = True, submit_retry_s: float = 10.0) -> Plan:
    """Pure: what to change, from the portal's unfinished jobs and Slurm's two answers.

    A job is bound to its Slurm job by id **and** identity (:func:`identity`): records of a later
    job that got the same id never change it. A job is shown ended only as accounting records
    that run's end (squeue's finished records carry no exit code, and a controller that lost
    the job may hold another job under its id); until then it keeps its last state. A job with
    no record of its own anywhere is ``forgotten`` when another job holds its id (Slurm forgot
    it) and ``unseen`` otherwise (the caller asks when the controller last started)."""
    out = Plan()
    live, done = Records(queue), Records(accounting)
    by_comment: dict[str, str] = {}
    for jid, st in queue.items():
        pid = portal_id_of(st)
        if pid:
            by_comment.setdefault(pid, jid.split("_")[0])
    for job in jobs:
        if job.state is JobState.SUBMITTING:
            if job.id in by_comment:
                out.adopt[job.id] = by_comment[job.id]
            elif (now - job.updated_at).total_seconds() > (
                    submit_retry_s if job.reason.startswith(CONTROLLER_DOWN) else submit_grace_s):
                out.resubmit.append(job.id)
            continue
        if not job.slurm_job_id:
            continue
        mine = identity(job)
        queued = obs = fold(live.of(job.slurm_job_id, mine))
        # squeue's record first: sacct keeps neither the dependency nor Slurm's last reason for it
        never = doomed(queued) if queued is not None else None
        if never is not None:
            out.doomed[job.id] = never
            continue
        if obs is None or obs.state.terminal:
            # gone from the queue, or finished (squeue keeps those a while, without exit codes):
            # how it ended is accounting's to say
            ended = fold(done.of(job.slurm_job_id, mine)) if accounting_ok else None
            if ended is not None and not final(ended):
                if ended.state.terminal:
                    continue        # slurmdbd is still writing how it ended: asked again next cycle
                ended = None        # accounting's record of a job the controller no longer has
            if ended is not None and obs is not None and ended.restarts is None:
                ended = replace(ended, restarts=obs.restarts)    # sacct has no restart count; squeue had
            if ended is None and obs is not None:
                continue            # ended, but accounting has not said how yet: asked again next cycle
            obs = ended
        if obs is None:
            if not accounting_ok:
                continue
            if live.others(job.slurm_job_id, mine) or done.others(job.slurm_job_id, mine):
                out.forgotten.append(job.id)
            else:
                out.unseen.append(job.id)
            continue
        never = doomed(obs)
        if never is not None:
            out.doomed[job.id] = never
            continue
        if (obs.state, obs.reason, obs.nodes) != (job.state, job.reason, job.nodes) or (
                obs.state.terminal and obs.exit_code != job.exit_code) or restarted(job, obs):
            out.updates[job.id] = obs
    return out


def forgotten_by_restart(jobs: Iterable[Job], controller_started: dt.datetime | None) -> list[str]:
    """Of the jobs no Slurm record mentions: those accepted before the controller last started
    (its restart lost them: it recovers only the state it had saved). None of them where the
    start time is unknown: a job is never declared lost on a guess."""
    if controller_started is None:
        return []
    out = []
    for job in jobs:
        at = job.submitted_at
        if at is not None and (at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)) < controller_started:
            out.append(job.id)
    return out


def externals(candidates: Mapping[str, list[JobStatus]], accounting: Records, accounting_ok: bool,
              ) -> tuple[list[JobStatus], set[str]]:
    """The plain-sbatch jobs to add: one status per job (an array's tasks folded), a finished
    one only with accounting's record of how it ended; and which of them are arrays."""
    found, arrays = [], set()
    for base, tasks in candidates.items():
        st = tasks[0]
        obs = fold(tasks)
        if obs.state.terminal:
            same = (lambda r: r.user == st.user and r.comment == st.comment
                    and (st.submitted is None or r.submitted is None or r.submitted == st.submitted))
            ended = fold(accounting.of(base, same)) if accounting_ok else None
            if ended is None or not final(ended):
                continue        # finished before the portal saw it: added once accounting says how
            obs = replace(ended, restarts=obs.restarts)
        submitted = min((t.submitted for t in tasks if t.submitted), default=None)
        found.append(JobStatus(base, obs.state, obs.reason, obs.nodes, obs.exit_code, obs.signal, st.user,
                               st.comment, st.name, obs.restarts, st.stdout, submitted=submitted,
                               started=obs.started, ended=obs.ended, partition=st.partition,
                               gpus=st.gpus))      # an array's: each task's
        if any(t.job_id != base for t in tasks):
            arrays.add(base)
    return found, arrays


def _state_message(obs: Observed) -> str:
    if obs.state is JobState.RUNNING:
        return "running on %s" % (obs.nodes or "?")
    text = reason_sentence(obs.state, obs.reason)[0]
    return obs.state.value.lower() + ((": " + text) if text else "")


def _transition_event(job: Job, obs: Observed) -> tuple[EventKind, str]:
    """The event of a state change (a requeue only where Slurm gives no restart count)."""
    if obs.state.terminal:
        code = "" if obs.exit_code is None else " with exit code %d" % obs.exit_code
        if obs.signal:
            code += " (signal %d)" % obs.signal
        return EventKind.FINISHED, "%s%s%s" % (obs.state.value, code, (": " + obs.reason) if obs.reason else "")
    if obs.restarts is None and _back_in_queue(job, obs):
        # no count from Slurm (a backend without one): a requeue shows only as this transition
        return EventKind.REQUEUED, "requeued%s" % ((" (%s)" % obs.reason) if obs.reason else "")
    return EventKind.STATE, _state_message(obs)


def _back_in_queue(job: Job, obs: Observed) -> bool:
    return job.state in (JobState.RUNNING, JobState.COMPLETING) and obs.state in (
        JobState.PENDING, JobState.REQUEUED, JobState.REQUEUE_HOLD)


def _requeue_message(job: Job, obs: Observed) -> str:
    first, last = job.restarts + 1, obs.restarts
    return "requeued (%s)" % ("restart %d" % last if first == last else "restarts %d-%d" % (first, last))


def _requeue_recorded(db: Session, job: Job) -> bool:
    """This requeue is on the timeline already (a requeue event is the job's latest state or
    requeue event): the health monitor's, or this reconciler's from when it saw Slurm's count
    rise while the job was still completing."""
    last = db.exec(select(Event).where(Event.job_id == job.id, Event.kind.in_([EventKind.STATE, EventKind.REQUEUED]))
                   .order_by(Event.id.desc())).first()
    return last is not None and last.kind is EventKind.REQUEUED


def _monitor_recorded(db: Session, job: Job, restarts: int) -> bool:
    """The health monitor recorded the requeue that made Slurm's count ``restarts`` (its event
    key names the job and the run before it; an array's tasks have keys of their own)."""
    key = "requeue:%s:%d" % (job.slurm_job_id, restarts - 1)
    return db.exec(select(Event.id).where(Event.key == key)).first() is not None


def _events(db: Session, job: Job, obs: Observed) -> tuple[list[tuple[EventKind, str]], int]:
    """The timeline events of one update (oldest first) and the job's restart count after it.

    One requeue event per rise of Slurm's count, whether or not a cycle saw the job pending in
    between (where Slurm gives no count: one per RUNNING -> PENDING seen); none for a requeue
    the timeline has already (the monitor's keyed event, or this one seen while completing)."""
    kind, message = _transition_event(job, obs)
    shown = obs.state is not job.state or kind is not EventKind.STATE or obs.state is JobState.PENDING
    plain = [(kind, message)] if shown else []
    if restarted(job, obs):
        if _monitor_recorded(db, job, obs.restarts):
            return ([] if _back_in_queue(job, obs) else plain), obs.restarts
        requeued = _requeue_message(job, obs)
        if obs.state.terminal:
            return [(EventKind.REQUEUED, requeued), (kind, message)], obs.restarts
        # one event with the state in it: the monitor's later note for this requeue takes over
        # the latest requeue event without a key, unless a "running" state event came after it
        return [(EventKind.REQUEUED, "%s; %s" % (requeued, _state_message(obs)))], obs.restarts
    if (kind is EventKind.REQUEUED or _back_in_queue(job, obs)) and _requeue_recorded(db, job):
        return [], job.restarts
    return plain, job.restarts + (1 if kind is EventKind.REQUEUED else 0)


def _utc(t: dt.datetime | None) -> dt.datetime | None:
    return None if t is None else (t.astimezone(dt.timezone.utc) if t.tzinfo else t.replace(tzinfo=dt.timezone.utc))


def own_end(job: Job, run: int | None = None, read=fence_done) -> tuple[int, dt.datetime] | None:
    """How a portal job's run (``run``: Slurm's restart count; None: its last) ended on its own,
    by the job folder's fence record (``read``: :func:`slurm.render.fence_done`): its exit
    status and when. None for a run that has not ended there, one a signal stopped (a time
    limit, a cancel, a requeue: Slurm's to say), plain sbatch jobs and arrays (no such record),
    or a record that cannot be read (logged)."""
    if job.external or not job.job_dir or not job.slurm_job_id:
        return None
    try:
        end = read(job.job_dir, job.slurm_job_id, run)
    except OSError as e:
        log.warning("job %s: cannot read its fence record in %s: %s", job.id, job.job_dir, e)
        return None
    if end is None or end[1]:
        return None
    return end[0], dt.datetime.fromtimestamp(end[2], dt.timezone.utc)


def _as_recorded(code: int, reason: str, nodes: str, ended: dt.datetime, restarts: int | None = None,
                 started: dt.datetime | None = None) -> Observed:
    """A run's end as its job folder records it."""
    return Observed(JobState.COMPLETED if code == 0 else JobState.FAILED, reason, nodes, code, 0, restarts,
                    started=started, ended=ended)


def ended_here(p: Plan, jobs: Mapping[str, Job], lost: dict[str, str]) -> None:
    """Of the jobs Slurm forgot, those whose run had ended on its own before (the job folder's
    fence record says so: its exit status, not stopped by a signal; slurmdbd may even have given
    its record to the later job that got its id): recorded as they ended, not submitted again,
    which would run them twice. A run a signal stopped (the restarted controller killing a job it
    no longer knows) is submitted again."""
    for job_id in list(lost):
        job = jobs[job_id]
        end = own_end(job)
        if end is None:
            continue
        code, ended = end
        p.updates[job_id] = _as_recorded(
            code, "Slurm lost its record of job %s (%s); the run had ended with exit code %d, as its job folder "
            "records" % (job.slurm_job_id, lost.pop(job_id), code), job.nodes, ended)


#: Slurm's ends of a run it ended itself (a limit, a node, a cancel). A controller restarted from
#: older state may not hear a run's end (it went to the controller before): it keeps the job
#: running until its time limit, then says TIMEOUT, though the run had ended on its own
ENDED_BY_SLURM = frozenset({JobState.TIMEOUT, JobState.NODE_FAIL, JobState.CANCELLED, JobState.DEADLINE})


def unheard_ends(p: Plan, jobs: Iterable[Job], live: Records, now: dt.datetime, grace_s: float,
                 read=fence_done) -> list[str]:
    """Runs that ended on their own while Slurm's controller did not hear it, by the job folder's
    fence record (its exit status, not stopped by a signal; ``read``: :func:`slurm.render.fence_done`):

    - Slurm still shows the run RUNNING ``grace_s`` after the record was written (a second
      instance of the run ends within seconds of it): put among the plan's updates as the
      record says; their Slurm ids are returned, to be cancelled (each holds its node until its
      time limit otherwise);
    - Slurm ended the run itself (:data:`ENDED_BY_SLURM`) after it had ended on its own: the
      plan's update says how it ended instead.

    A run a signal stopped (a time limit, a cancel) ended as Slurm says. Arrays and plain sbatch
    jobs have no such record: as Slurm says."""
    stale = []
    for job in jobs:
        if job.external or not job.slurm_job_id:
            continue
        update = p.updates.get(job.id)
        obs = update or fold(live.of(job.slurm_job_id, identity(job)))
        if obs is None or not (obs.state is JobState.RUNNING or (update and obs.state in ENDED_BY_SLURM)):
            continue
        end = own_end(job, obs.restarts, read)
        if end is None:
            continue
        code, ended = end
        if obs.state is JobState.RUNNING:
            since = (now - ended).total_seconds()
            if since < grace_s:
                continue
            said = "Slurm still shows it running %d s later: cancelled there" % since
            stale.append(job.slurm_job_id)
        elif obs.ended is not None and _utc(obs.ended) < ended:
            continue        # Slurm ended it before the record was written: a later end of its own
        else:
            said = "Slurm says %s" % obs.state.value
        p.updates[job.id] = _as_recorded(
            code, "the run ended on its own with exit code %d, as its job folder records; %s (its controller did not "
            "hear the end: it restarted from older state)" % (code, said), obs.nodes or job.nodes, ended,
            obs.restarts, obs.started)
    return stale


def apply(db: Session, jobs: dict[str, Job], p: Plan, now: dt.datetime,
          lost: Mapping[str, str] = {}) -> list[str]:
    """Write one plan's state changes and events (the caller commits). Times are Slurm's where
    it gives them (a cycle may come long after the fact: the reconciler was down). ``lost``:
    jobs Slurm forgot, with why; a portal job goes back to SUBMITTING, to be submitted again
    once (their ids are returned), a plain sbatch job becomes UNKNOWN."""
    for job_id, obs in p.updates.items():
        job = jobs[job_id]
        events, job.restarts = _events(db, job, obs)
        at = _utc(obs.ended) if obs.state.terminal and obs.ended else now
        started = _utc(obs.started)
        if started is not None and job.started_at is None and obs.state is not JobState.RUNNING:
            # it ran between two cycles (or while the reconciler was down): the timeline says so
            events.insert(0, (EventKind.STATE, "running on %s" % (obs.nodes or "?"), started, JobState.RUNNING))
        job.state, job.reason, job.nodes = obs.state, obs.reason[:1024], obs.nodes[:1024]
        if job.started_at is None and (started is not None or obs.state is JobState.RUNNING):
            job.started_at = started or now
        if obs.state.terminal:
            job.exit_code, job.signal = obs.exit_code, obs.signal
            job.ended_at = at if obs.ended else (job.ended_at or now)
            if job.job_dir and not job.external:
                try:
                    pending = finish_job_data(job.job_dir)
                except OSError as e:
                    log.warning("job %s: cannot tidy its folder %s: %s", job.id, job.job_dir, e)
                    pending = []
                job.stage_out_pending = json.dumps(pending) if pending else None
        job.updated_at = now
        db.add(job)
        # Slurm's times, but never before what the timeline already shows (a cycle recorded
        # "running" when it saw it, after Slurm's start): the timeline stays in order
        floor = _utc(db.exec(select(func.max(Event.at)).where(Event.job_id == job.id)).one()) if events else None
        for ev in events:
            kind, message = ev[0], ev[1]
            when = ev[2] if len(ev) > 2 else at
            if floor is not None and when < floor:
                when = floor
            floor = when
            db.add(Event(at=when, kind=kind, job_id=job.id, user_id=job.user_id,
                         state=ev[3] if len(ev) > 3 else obs.state, node=obs.nodes or None, message=message[:2000]))
        log.info("job %s (Slurm %s): %s", job.id, job.slurm_job_id,
                 "; ".join(ev[1] for ev in events) or _state_message(obs))
    for job_id, slurm_id in p.adopt.items():
        job = jobs[job_id]
        job.slurm_job_id, job.state, job.submitted_at, job.updated_at = slurm_id, JobState.PENDING, now, now
        job.reason = ""
        db.add(job)
        db.add(Event(at=now, kind=EventKind.SUBMITTED, job_id=job.id, user_id=job.user_id, state=JobState.PENDING,
                     message="found in Slurm as job %s (the portal stopped before recording it)" % slurm_id))
        log.info("job %s: adopted Slurm job %s by its comment", job_id, slurm_id)
    again = []
    for job_id, why in lost.items():
        job = jobs[job_id]
        key = "lost:%s:%s" % (job.id, job.slurm_job_id)
        if db.exec(select(Event.id).where(Event.key == key)).first() is not None:
            continue        # this loss is handled already (another reconciler)
        if job.external:
            job.state, job.reason, job.updated_at, job.ended_at = JobState.UNKNOWN, "Slurm has no record of it", now, now
            message, state = "Slurm has no record of job %s any more (%s)" % (job.slurm_job_id, why), JobState.UNKNOWN
        else:
            message = "Slurm lost job %s (%s); submitting it again" % (job.slurm_job_id, why)
            job.state, job.reason, job.slurm_job_id, job.nodes = JobState.SUBMITTING, "lost by Slurm: " + why, None, ""
            job.updated_at, state = now, JobState.SUBMITTING
            again.append(job.id)
        db.add(job)
        db.add(Event(at=now, kind=EventKind.FINISHED if job.external else EventKind.REQUEUED, job_id=job.id,
                     user_id=job.user_id, state=state, message=message[:2000], key=key))
        log.warning("job %s: %s", job.id, message)
    return again


def add_external(db: Session, found: list[JobStatus], users: Mapping[str, int], now: dt.datetime,
                 arrays: set[str] = frozenset(), node_types: Mapping[str, NodeType] | None = None) -> None:
    """Plain sbatch jobs found in the queue, with Slurm's times and (ended) exit code, their
    partition and GPUs (squeue's TRES), and the node type of that partition."""
    by_partition = {t.partition: name for name, t in (node_types or {}).items()}
    new = []
    for st in found:
        # where it logs (squeue's StdOut; its symbols are filled in when the log is read)
        request = {"stdout": st.stdout, **({"array": True} if st.job_id in arrays else {})} if st.stdout else {}
        started = _utc(st.started) or (now if st.state is JobState.RUNNING else None)
        job = Job(user_id=users[st.user], name=(st.name or "sbatch-%s" % st.job_id)[:128], state=st.state,
                  slurm_job_id=st.job_id, external=True, request_json=json.dumps(request), reason=st.reason[:1024],
                  nodes=st.nodes[:1024], restarts=st.restarts or 0, partition=st.partition[:64],
                  gpus=st.gpus or 0, node_type=by_partition.get(st.partition, "")[:32],
                  exit_code=st.exit_code if st.state.terminal else None, signal=st.signal if st.state.terminal else None,
                  submitted_at=_utc(st.submitted) or now, started_at=started, updated_at=now,
                  ended_at=(_utc(st.ended) or now) if st.state.terminal else None)
        db.add(job)
        new.append((job, st))
    db.flush()      # the jobs first: events refer to them
    for job, st in new:
        db.add(Event(at=job.submitted_at, kind=EventKind.SUBMITTED, job_id=job.id, user_id=job.user_id, state=st.state,
                     message="submitted with sbatch as Slurm job %s (found by the portal)" % st.job_id))


@dataclass
class CycleStats:
    jobs: int = 0
    updated: int = 0
    adopted: int = 0
    resubmitted: int = 0
    external: int = 0
    lost: int = 0
    slurm_calls: int = 0
    services: int = 0
    seconds: float = 0.0


class Reconciler:
    """Runs cycles against a database engine and a Slurm backend."""

    def __init__(self, engine, backend, settings, box=None):
        from portal.daemons.controller import ServiceController
        self.engine, self.backend, self.settings, self.box = engine, backend, settings, box
        #: inference services: one step of every cycle, on this cycle's squeue answer
        self.services = ServiceController(engine, backend, settings, box)
        from portal.services.stage_out import StageOuts
        #: finishing stage-outs that ended, and the hourly credentials sweep (portal.services.stage_out)
        self.stage_outs = StageOuts(engine, backend, settings)

    def cycle(self) -> CycleStats:
        t0 = time.monotonic()
        stats = CycleStats()
        now = utcnow()
        with Session(self.engine, expire_on_commit=False) as db:
            jobs = list(db.exec(select(Job).where(Job.state.not_in(list(TERMINAL | {JobState.UNKNOWN})))))
            stats.jobs = len(jobs)
            queue = self.backend.queue()
            stats.slurm_calls = 1
            live = Records(queue)
            users: dict[str, int] = {}
            # a Unix account several portal users share goes to the first non-admin one
            for u in db.exec(select(User).where(User.unix_user != "", User.disabled == False)  # noqa: E712
                             .order_by(User.is_admin, User.id)):
                users.setdefault(u.unix_user, u.id)
            known = self._known_slurm_ids(db, queue)
            candidates = external_candidates(queue, known, set(users), self._own_comments(db, queue))
            # jobs not in the queue as themselves, or finished there: how they ended is accounting's
            ended = {j.slurm_job_id for j in jobs if j.slurm_job_id and (
                not (recs := live.of(j.slurm_job_id, identity(j))) or any(r.state.terminal for r in recs))}
            ended |= {base for base, tasks in candidates.items() if any(t.state.terminal for t in tasks)}
            accounting: list[JobStatus] = []
            accounting_ok = True
            if ended:
                try:
                    accounting = self.backend.accounting_runs(sorted(ended))
                except SlurmError as e:
                    accounting_ok = False
                    log.warning("accounting did not answer (%s): jobs that ended are recorded once it does", e)
                stats.slurm_calls += 1
            p = plan(jobs, queue, accounting, known, set(users), now, self.settings.submit_grace_s,
                     accounting_ok=accounting_ok, submit_retry_s=self.settings.submit_retry_s)
            found, arrays = externals(candidates, Records(accounting), accounting_ok)
            by_id = {j.id: j for j in jobs}
            lost = {jid: "another job holds its id: its controller restarted and forgot it" for jid in p.forgotten}
            if p.unseen:
                try:
                    started = self.backend.controller_started()
                except SlurmError as e:
                    log.warning("cannot ask when the controller started: %s", e)
                    started = None
                stats.slurm_calls += 1
                for jid in forgotten_by_restart([by_id[j] for j in p.unseen], started):
                    lost[jid] = "the controller restarted at %s UTC and no longer knows it" % (
                        started.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
            ended_here(p, by_id, lost)
            for slurm_id in unheard_ends(p, jobs, live, now, self.settings.unheard_end_grace_s):
                try:
                    self.backend.cancel(slurm_id)
                except SlurmError as e:
                    log.warning("cannot cancel Slurm job %s, whose run had ended: %s", slurm_id, e)
                stats.slurm_calls += 1
            stats.slurm_calls += self._end_doomed(p, by_id, live, Records(accounting))
            again = apply(db, by_id, p, now, lost)
            add_external(db, found, users, now, arrays, self.settings.node_types)
            db.commit()
            stats.updated, stats.adopted, stats.external = len(p.updates), len(p.adopt), len(found)
            stats.lost = len(lost)
            for job_id in p.resubmit + again:
                stats.resubmitted += self._resubmit(db, by_id[job_id])
        try:
            stats.services = self.services.cycle(queue)
        except Exception:   # noqa: BLE001 -- a service problem must not stop the jobs' reconciliation
            log.exception("services step failed; retrying next cycle")
        self.stage_outs.cycle(now)      # stage-outs finished from the portal; the credentials sweep
        stats.seconds = time.monotonic() - t0
        return stats

    def _end_doomed(self, p: Plan, jobs: dict[str, Job], live: Records, done: Records) -> int:
        """Jobs that can never start: cancel each in Slurm and put it among the plan's updates as
        FAILED, with the reason in words (:func:`portal.services.conversions.dependency_reason`:
        for an image conversion, its own error). How the failed jobs ended comes from accounting
        (one sacct call for all of them, only when some are not in this cycle's answers); a job
        scancel refuses stays as it is until the next cycle. Returns the Slurm calls made."""
        if not p.doomed:
            return 0
        firsts = {d.failed[0] for d in p.doomed.values() if d.failed}
        calls = 0
        missing = sorted(f for f in firsts if not _ended_record(done.of(f)))
        if missing:
            try:
                done = Records(done.all() + list(self.backend.accounting(missing).values()))
            except SlurmError as e:
                log.warning("cannot ask accounting how jobs %s ended: %s", ",".join(missing), e)
            calls += 1
        reasons: dict[str, str] = {"": dependency_failed("")}     # one log read per failed job
        for dep in sorted(firsts):
            record = _ended_record(done.of(dep)) or _ended_record(live.of(dep))
            reasons[dep] = dependency_reason(self.settings, dep, record)
        for job_id, d in p.doomed.items():
            job = jobs[job_id]
            reason = reasons[d.failed[0] if d.failed else ""]
            if d.live:
                try:
                    self.backend.cancel(job.slurm_job_id)
                except SlurmError as e:
                    log.warning("job %s (Slurm %s) can never start, but scancel failed (trying again next "
                                "cycle): %s", job.id, job.slurm_job_id, e)
                    continue
                calls += 1
            log.info("job %s (Slurm %s) can never start, cancelled: %s", job.id, job.slurm_job_id, reason)
            p.updates[job_id] = Observed(JobState.FAILED, reason)
        return calls

    def _known_slurm_ids(self, db: Session, queue: Mapping[str, JobStatus]) -> set[str]:
        bases = sorted({k.split("_")[0] for k in queue})
        known: set[str] = set()
        for i in range(0, len(bases), 500):
            chunk = bases[i:i + 500]
            known.update(db.exec(select(Job.slurm_job_id).where(Job.slurm_job_id.in_(chunk))))
        return known

    def _own_comments(self, db: Session, queue: Mapping[str, JobStatus]) -> set[tuple[str, str]]:
        """(comment, Unix account) of the queue's ``aiportal:`` comments that name a job, replica
        or build the portal stored for that account (one query per kind, for the ids the queue shows)."""
        claims = claimed_comments(queue)
        # per kind: its id column, the query of (id, owner's Unix account), its comment's prefix
        kinds = {"job": (Job.id, select(Job.id, User.unix_user).join(User, User.id == Job.user_id), COMMENT_PREFIX),
                 "service": (ServiceReplica.id, select(ServiceReplica.id, User.unix_user)
                             .join(Service, Service.id == ServiceReplica.service_id)
                             .join(User, User.id == Service.user_id), COMMENT_PREFIX + "service:"),
                 "build": (ImageBuild.id, select(ImageBuild.id, User.unix_user)
                           .join(User, User.id == ImageBuild.user_id), COMMENT_PREFIX + "build:")}
        own: set[tuple[str, str]] = set()
        for kind, (key, q, prefix) in kinds.items():
            ids: list = sorted({i for i, _ in claims[kind]})
            if kind == "build":     # users write comments: only ids a build can have
                ids = [int(i) for i in ids if _BUILD_ID.fullmatch(i)]
            for i in range(0, len(ids), 500):
                for row_id, unix in db.exec(q.where(key.in_(ids[i:i + 500]))):
                    if (str(row_id), unix) in claims[kind]:
                        own.add((prefix + str(row_id), unix))
        return own

    def _resubmit(self, db: Session, job: Job) -> int:
        from portal.services.jobs import submit_again
        try:
            return 1 if submit_again(db, self.settings, self.backend, self.box, job) else 0
        except Exception as e:   # noqa: BLE001 -- one bad job must not stop the loop; it is marked FAILED
            log.warning("job %s: submitting it again failed: %s", job.id, e)
            return 0

    def run(self, interval: float, stop: threading.Event | None = None) -> None:
        """Cycle every ``interval`` seconds until ``stop`` is set (or SIGTERM/SIGINT)."""
        def cycle() -> str | None:
            s = self.cycle()
            if s.updated or s.adopted or s.resubmitted or s.external or s.lost:
                return ("%d jobs, %d updated, %d adopted, %d lost by Slurm, %d resubmitted, %d external, %.3fs"
                        % (s.jobs, s.updated, s.adopted, s.lost, s.resubmitted, s.external, s.seconds))
            return None
        run_loop("reconciler", cycle, interval, stop)
