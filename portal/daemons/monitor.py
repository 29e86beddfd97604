"""The monitor daemon (``aiportal monitor``, beside the reconciler on the portal host).

Each cycle: one ``sinfo`` look at the nodes (two calls: states, GPUs in use) and one ``squeue``
with restart counts, then the pure :func:`monitor.recovery.plan`, then:

- node conditions are compared with ``node_records`` by compare-and-set: each change (drained,
  resumed, went down, came back) becomes one node event on the cluster page;
- requeued jobs are released from Slurm's requeue hold at once (``StartTime=now``);
- jobs running on a node aiportal drained for a hard failure are requeued, or, if they opted
  out of requeue, sent SIGTERM in their batch shell (the script passes it to the program and
  stages the outputs out). Each such action is claimed first by inserting its keyed event in
  the same transaction: of two monitors only one acts, and a failed action leaves no event;
- each requeue, and each no-requeue job that died with its node, becomes one job event on the
  job's timeline (keyed, so recorded once), and its owner is notified (:mod:`portal.services.notify`).

The health checks themselves run on the nodes (Slurm's HealthCheckProgram) and drain or resume
their own node; this daemon sees those drains through Slurm.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, select

from monitor.recovery import LAUNCH_FAILED_HELD, JobAction, JobNote, Memory, plan
from portal.daemons.loop import run_loop
from portal.models import Event, EventKind, Job, NodeRecord, User, utcnow
from portal.services.nodes import record_node
from portal.services.notify import Notifier, notify_wanted
from portal.settings import Settings
from slurm.errors import SlurmError
from slurm.states import JobState

log = logging.getLogger(__name__)


@dataclass
class MonitorStats:
    node_events: int = 0
    released: int = 0
    requeued: int = 0
    stopped: int = 0
    job_events: int = 0
    notified: int = 0
    slurm_calls: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return ("%d node events, %d released, %d requeued, %d stopped, %d job events, %d notified, "
                "%d Slurm calls, %.3fs" % (self.node_events, self.released, self.requeued, self.stopped,
                                           self.job_events, self.notified, self.slurm_calls, self.seconds))


class HealthMonitor:
    def __init__(self, engine, backend, settings: Settings, notifier: Notifier | None = None):
        self.engine, self.backend, self.settings = engine, backend, settings
        self.notifier = notifier or Notifier(engine, settings)
        self.memory = Memory()
        self.recorded: set[str] = set()      #: event keys known to be in the database
        self.acted = False

    def cycle(self) -> MonitorStats:
        t0 = time.monotonic()
        stats = MonitorStats()
        view = self.backend.cluster()
        jobs = self.backend.recovery_jobs()
        stats.slurm_calls = 3
        now = utcnow()
        p = plan(view.nodes, jobs, self.memory, now, self.settings.monitor_release_within_s)
        self._first_sight(p.conditions)
        with Session(self.engine, expire_on_commit=False) as db:
            for node, (cond, reason) in sorted(p.conditions.items()):
                if record_node(db, node, cond, reason, self.settings):
                    stats.node_events += 1
                    log.info("node %s: %s %s", node, cond.value, reason)
            db.commit()
        for job in p.release:
            try:
                self.backend.release(job.job_id, held=job.reason == LAUNCH_FAILED_HELD)
                stats.released += 1
                log.info("job %s: released from the requeue hold (run %d)", job.job_id, job.restarts + 1)
            except SlurmError as e:
                log.warning("job %s: cannot release it: %s", job.job_id, e)
        for action in p.requeue + p.stop:
            if self._act(action):
                if action.job.requeue:
                    stats.requeued += 1
                else:
                    stats.stopped += 1
        stats.slurm_calls += stats.released + stats.requeued + stats.stopped
        for note in p.notes:
            if note.key not in self.recorded and self._record_note(note):
                stats.job_events += 1
        self.acted = bool(stats.requeued or stats.stopped)
        try:
            stats.notified = self.notifier.deliver_due()
        except sa.exc.SQLAlchemyError as e:
            log.warning("notifications: %s", e)
        stats.seconds = time.monotonic() - t0
        return stats

    def _first_sight(self, conditions) -> None:
        """Nodes never seen before are recorded as they are, without an event (each in its own
        transaction: another monitor may record the same node at the same time)."""
        with Session(self.engine) as db:
            known = set(db.exec(select(NodeRecord.name)))
        now = utcnow()
        for node, (cond, reason) in sorted(conditions.items()):
            if node in known:
                continue
            with Session(self.engine) as db:
                db.add(NodeRecord(name=node, condition=cond, reason=reason[:1024], since=now, updated_at=now))
                try:
                    db.commit()
                except sa.exc.IntegrityError:
                    db.rollback()

    # -- jobs -----------------------------------------------------------------------------------

    def _portal_job(self, db: Session, slurm_id: str) -> Job | None:
        base = slurm_id.split("_")[0]
        return db.exec(select(Job).where(Job.slurm_job_id == base)).first()

    def _unix_owner(self, db: Session, unix_user: str) -> int | None:
        if not unix_user:
            return None
        u = db.exec(select(User).where(User.unix_user == unix_user, User.disabled == False)  # noqa: E712
                    .order_by(User.is_admin, User.id)).first()
        return u.id if u else None

    def _event_for(self, db: Session, slurm_id: str, unix_user: str, kind: EventKind, key: str, message: str,
                   node: str | None, restarts: int = 0) -> Event:
        job = self._portal_job(db, slurm_id)
        now = utcnow()
        if job is not None:
            if restarts and restarts > job.restarts:
                job.restarts = restarts
                db.add(job)
            return Event(at=now, kind=kind, job_id=job.id, user_id=job.user_id, state=job.state, node=node,
                         key=key, message=message[:2000],
                         notify_after=now if notify_wanted(self.settings, has_owner=True) else None)
        owner = self._unix_owner(db, unix_user)
        return Event(at=now, kind=kind, node=node, user_id=owner, key=key,
                     message=("Slurm job %s%s: %s" % (slurm_id, " of " + unix_user if unix_user else "", message))[:2000],
                     notify_after=now if notify_wanted(self.settings, has_owner=owner is not None) else None)

    def _act(self, action: JobAction) -> bool:
        """Claim the action with its keyed event, check the job is still where the plan saw it,
        act, and commit; on any failure nothing is recorded (the next cycle tries again)."""
        job = action.job
        kind = EventKind.REQUEUED if job.requeue else EventKind.NODE_DOWN
        if job.requeue:
            message = ("%s; requeued to start again elsewhere (run %d), from its last checkpoint"
                       % (action.why, job.restarts + 2))
        else:
            message = ("%s; it opted out of requeue: sent SIGTERM to its batch script, which stops the program "
                       "and stages its outputs out" % action.why)
        with Session(self.engine, expire_on_commit=False) as db:
            try:
                # requeue:ID:RUN is also the key of the requeue Slurm reports next: one event for both
                key = "requeue:%s:%d" % (job.job_id, job.restarts) if job.requeue else action.key
                db.add(self._event_for(db, job.job_id, job.user, kind, key, message, action.node, job.restarts + 1
                                       if job.requeue else 0))
                db.flush()
            except sa.exc.IntegrityError:
                db.rollback()
                return False          # another monitor has it (or had it)
            try:
                now_seen = self.backend.recovery_jobs(job_ids=[job.job_id]).get(job.job_id)
                if now_seen is None or now_seen.restarts != job.restarts or now_seen.state is not job.state \
                        or now_seen.nodes != job.nodes:
                    db.rollback()
                    return False
                if job.requeue:
                    self.backend.requeue_now(job.job_id)
                else:
                    self.backend.signal_batch(job.job_id, "TERM")
            except SlurmError as e:
                db.rollback()
                log.warning("job %s on %s: %s failed: %s", job.job_id, action.node,
                            "requeue" if job.requeue else "stop", e)
                return False
            db.commit()
        self.recorded.add("requeue:%s:%d" % (job.job_id, job.restarts) if job.requeue else action.key)
        log.warning("job %s: %s", job.job_id, message)
        return True

    def _record_note(self, note: JobNote) -> bool:
        kind = EventKind.REQUEUED if note.kind == "requeued" else EventKind.NODE_DOWN
        with Session(self.engine, expire_on_commit=False) as db:
            if db.exec(select(Event.id).where(Event.key == note.key)).first() is not None:
                self.recorded.add(note.key)
                return False
            ev = self._event_for(db, note.job_id, note.user, kind, note.key, note.message, note.node, note.restarts)
            if kind is EventKind.REQUEUED and ev.job_id:
                # the reconciler may have seen the same requeue first: make its event this one
                recent = db.exec(select(Event).where(Event.job_id == ev.job_id,
                                                     Event.kind.in_([EventKind.STATE, EventKind.REQUEUED]))
                                 .order_by(Event.id.desc()).limit(10)).all()
                for old in recent:
                    if old.kind is EventKind.STATE and old.state is JobState.RUNNING:
                        break           # the job ran since: that requeue was another one
                    if old.kind is EventKind.REQUEUED and old.key is None:
                        old.key, old.message, old.node, old.notify_after = ev.key, ev.message, ev.node, ev.notify_after
                        ev = old
                        break
            try:
                db.add(ev)
                db.commit()
            except sa.exc.IntegrityError:
                db.rollback()
                self.recorded.add(note.key)
                return False
        self.recorded.add(note.key)
        log.info("job %s: %s", note.job_id, note.message)
        return True

    def run(self, interval: float, stop: threading.Event | None = None) -> None:
        """Cycle every ``interval`` seconds until ``stop`` is set (or SIGTERM/SIGINT); a cycle
        that acted is followed by a quick one (to release what it requeued)."""
        def cycle() -> str | None:
            s = self.cycle()
            if s.node_events or s.released or s.requeued or s.stopped or s.job_events or s.notified:
                return s.summary()
            return None
        run_loop("monitor", cycle, interval, stop, pause=lambda: 0.5 if self.acted else interval)
