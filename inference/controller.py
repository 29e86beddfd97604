"""The service controller's decisions: a pure function from what was observed to what to do.

Every cycle the portal's controller (``portal/services/inference.py``) gathers, for each
service, its replicas with their Slurm job state and a fresh ``/healthz`` + ``/stats`` probe,
and calls :func:`plan_service`. The plan says, per replica, its new phase (and whether to
cancel its job), and for the service: replicas to submit (by generation), the replica count the
autoscaler wants, whether a rolling update finished or failed, whether a deleted service is gone.

Replica phases::

    PENDING --job runs--> STARTING --/healthz 200--> READY <--probe passes-- UNHEALTHY
       |                     |  (startup timeout:        |  (failure_threshold      |  (unhealthy
       |                     |   cancelled, replaced)    |   probes fail) -------->  |   timeout: replaced)
       +----------+----------+---------------------------+---> DRAINING (out of rotation; job
                  v                                               cancelled after drain_grace_s)
               ENDED (the job is over; a replica that was serving is replaced at once)

Only READY replicas take requests. Scaling: the average number of requests in flight on the
READY replicas (from the runtime's ``inflight_seconds`` counter, over the last cycle) divided by
``target_inflight`` gives the wanted count, clamped to [min, max]; up at once, down one replica
at a time after the load stayed low for ``scale_down_delay_s``. A rolling update (generation
G -> G+1) adds one new replica, waits until it is READY, drains one old one, and repeats; the
first new replica that fails to start ends the update, and the old version keeps serving. A
gray release (``next_weight`` set) runs ``canary_replicas`` of G+1 beside G's replicas and the
router sends ``next_weight`` % of the requests to them; it becomes a rolling update when the
weight is set to 100 (the canaries count as new replicas) and ends when it is set to 0.
"""
from __future__ import annotations

import datetime as dt
import enum
import math
from dataclasses import dataclass, field, replace

from inference.probe import ProbeResult
from slurm.states import JobState


class Phase(enum.Enum):
    PENDING = "PENDING"        #: submitted; waiting in Slurm's queue
    STARTING = "STARTING"      #: the job runs; the model is loading (or not probed ready yet)
    READY = "READY"            #: answers /healthz: in rotation
    UNHEALTHY = "UNHEALTHY"    #: was ready, probes now fail: out of rotation
    DRAINING = "DRAINING"      #: out of rotation; its job is cancelled after a grace period
    ENDED = "ENDED"            #: its job is over


LIVE = frozenset({Phase.PENDING, Phase.STARTING, Phase.READY, Phase.UNHEALTHY})


@dataclass(frozen=True)
class Timing:
    """Probe and lifecycle timing (site settings)."""

    initial_delay_s: float = 0.5       #: after the job starts, before the first probe
    probe_timeout_s: float = 1.0
    failure_threshold: int = 3         #: failed probes in a row before a READY replica is taken out
    unhealthy_timeout_s: float = 30.0  #: an UNHEALTHY replica is replaced after this long
    startup_timeout_s: float = 600.0   #: a replica not READY this long after its job started is replaced
    drain_grace_s: float = 2.0         #: routers stop using a DRAINING replica within this time
    lost_grace_s: float = 60.0         #: a job Slurm does not know this long after submission is over
    max_backoff_s: float = 300.0       #: the longest wait between failed starts


@dataclass(frozen=True)
class ReplicaView:
    id: str
    generation: int
    phase: Phase
    created_at: dt.datetime
    job_state: JobState | None = None     #: None: Slurm has no record of the job
    job_detail: str = ""                  #: e.g. the exit code, for messages
    probe: ProbeResult | None = None      #: this cycle's probe, None when not probed
    started_at: dt.datetime | None = None
    ready_at: dt.datetime | None = None
    probe_failures: int = 0
    unhealthy_since: dt.datetime | None = None
    draining_since: dt.datetime | None = None
    cancel_requested: bool = False
    last_inflight_seconds: float | None = None
    last_sample_at: dt.datetime | None = None
    avg_inflight: float | None = None     #: requests in flight on average since the last sample
    message: str = ""


@dataclass(frozen=True)
class ServiceView:
    id: str
    generation: int
    min_replicas: int
    max_replicas: int
    desired: int
    target_inflight: float = 4.0
    scale_down_delay_s: float = 60.0
    next_generation: int | None = None    #: a rolling update to this generation is under way
    #: gray release: the next generation runs beside the current one and takes this share (%)
    #: of the requests, until the weight becomes 100 (then it rolls out) or 0 (it is stopped)
    next_weight: int | None = None
    canary_replicas: int = 1
    deleting: bool = False
    low_since: dt.datetime | None = None
    failures: int = 0                     #: replicas in a row that ended without becoming READY
    last_failure_at: dt.datetime | None = None


@dataclass
class ServicePlan:
    replicas: list[ReplicaView] = field(default_factory=list)     #: every replica, updated
    cancel: list[str] = field(default_factory=list)               #: replica ids whose job to cancel
    submit: list[int] = field(default_factory=list)               #: a generation per new replica
    desired: int = 0
    low_since: dt.datetime | None = None
    failures: int = 0
    last_failure_at: dt.datetime | None = None
    rollout: str | None = None            #: "done" or "failed" when a rolling update ended this cycle
    rollout_message: str = ""
    delete: bool = False                  #: a deleted service has no replica left
    events: list[str] = field(default_factory=list)               #: what happened, for the log


def _secs(now: dt.datetime, t: dt.datetime | None) -> float:
    return (now - t).total_seconds() if t is not None else 0.0


def observe(r: ReplicaView, now: dt.datetime, timing: Timing) -> tuple[ReplicaView, bool, bool]:
    """One replica's new state from its job and probe: (replica, cancel it, it failed to start)."""
    if r.phase is Phase.ENDED:
        return r, False, False
    job_over = (r.job_state is not None and r.job_state.terminal) or (
        r.job_state is None and _secs(now, r.created_at) > timing.lost_grace_s)
    if job_over:
        what = r.job_state.value if r.job_state is not None else "unknown to Slurm"
        failed = r.ready_at is None and r.phase is not Phase.DRAINING and not r.cancel_requested
        msg = "job ended (%s%s)" % (what, ", " + r.job_detail if r.job_detail else "")
        if failed:
            msg += " before the replica became ready; see its log"
        return replace(r, phase=Phase.ENDED, message=msg, probe=None, avg_inflight=None), False, failed
    if r.phase is Phase.DRAINING:
        due = r.ready_at is None or _secs(now, r.draining_since) >= timing.drain_grace_s
        return r, due and not r.cancel_requested, False
    if r.job_state is not JobState.RUNNING:
        phase = Phase.PENDING if r.phase in (Phase.PENDING, Phase.STARTING) else r.phase
        return replace(r, phase=phase, avg_inflight=None), False, False
    started = r.started_at or now
    r = replace(r, started_at=started, phase=Phase.STARTING if r.phase is Phase.PENDING else r.phase)
    p = r.probe
    if p is not None and p.ready:
        avg, last_s, last_at = None, r.last_inflight_seconds, r.last_sample_at
        if p.inflight_seconds is not None:
            if last_s is not None and last_at is not None and p.inflight_seconds >= last_s and now > last_at:
                avg = (p.inflight_seconds - last_s) / (now - last_at).total_seconds()
            last_s, last_at = p.inflight_seconds, now
        return replace(r, phase=Phase.READY, probe_failures=0, ready_at=r.ready_at or now, unhealthy_since=None,
                       last_inflight_seconds=last_s, last_sample_at=last_at, avg_inflight=avg,
                       message="" if r.phase is Phase.READY else "ready"), False, False
    if r.phase is Phase.STARTING:
        if _secs(now, started) > timing.startup_timeout_s:
            return replace(r, message="not ready %.0fs after its job started (%s); replaced"
                           % (timing.startup_timeout_s, p.detail if p else "no endpoint")), True, True
        return r, False, False
    if p is None:          # READY/UNHEALTHY but not probed this cycle (no endpoint): nothing new
        return r, False, False
    failures = r.probe_failures + 1
    if r.phase is Phase.READY and failures >= timing.failure_threshold:
        return replace(r, phase=Phase.UNHEALTHY, probe_failures=failures, unhealthy_since=now, avg_inflight=None,
                       message="taken out: %d probes failed (%s)" % (failures, p.detail)), False, False
    if r.phase is Phase.UNHEALTHY and _secs(now, r.unhealthy_since) > timing.unhealthy_timeout_s:
        return replace(r, probe_failures=failures, message="unhealthy for %.0fs (%s); replaced"
                       % (timing.unhealthy_timeout_s, p.detail)), True, False
    return replace(r, probe_failures=failures), False, False


def wanted_replicas(svc: ServiceView, replicas: list[ReplicaView], now: dt.datetime) -> tuple[int, dt.datetime | None]:
    """The autoscaler: (replica count, since when the load has been low)."""
    lo, hi = svc.min_replicas, svc.max_replicas
    desired = min(max(svc.desired, lo), hi)
    ready = [r for r in replicas if r.phase is Phase.READY]
    if lo == hi or not ready or any(r.avg_inflight is None for r in ready):
        return desired, None if lo == hi else svc.low_since
    load = sum(r.avg_inflight for r in ready)
    want = min(max(math.ceil(load / svc.target_inflight - 1e-9), lo), hi)
    if want > desired:
        return want, None
    if want < desired:
        if svc.low_since is None:
            return desired, now
        if _secs(now, svc.low_since) >= svc.scale_down_delay_s:
            return desired - 1, now if desired - 1 > want else None
        return desired, svc.low_since
    return desired, None


def _drain(r: ReplicaView, now: dt.datetime, why: str) -> ReplicaView:
    return replace(r, phase=Phase.DRAINING, draining_since=now, avg_inflight=None, message=why)


def _drain_order(r: ReplicaView) -> tuple:
    """Which replica goes first: not serving before serving, then the least loaded, the newest."""
    return (r.phase is Phase.READY, r.avg_inflight or 0.0, -r.created_at.timestamp())


def plan_service(svc: ServiceView, replicas: list[ReplicaView], now: dt.datetime,
                 timing: Timing = Timing()) -> ServicePlan:
    out = ServicePlan(desired=svc.desired, low_since=svc.low_since, failures=svc.failures,
                      last_failure_at=svc.last_failure_at)
    rs: dict[str, ReplicaView] = {}
    cancel: set[str] = set()
    failed_new = []
    for r in replicas:
        nr, do_cancel, failed = observe(r, now, timing)
        rs[nr.id] = nr
        if do_cancel:
            cancel.add(nr.id)
        if failed:
            out.failures += 1
            out.last_failure_at = now
            if svc.next_generation is not None and nr.generation == svc.next_generation:
                failed_new.append(nr)
            out.events.append("replica %s: %s" % (nr.id[:8], nr.message))
        elif nr.phase is not r.phase:
            out.events.append("replica %s: %s -> %s%s" % (nr.id[:8], r.phase.value, nr.phase.value,
                                                          (" (%s)" % nr.message) if nr.message else ""))
        if nr.phase is Phase.READY:
            out.failures = 0
    # replicas being replaced (startup or unhealthy timeout) leave the rotation now
    for rid in list(cancel):
        if rs[rid].phase in LIVE:
            rs[rid] = replace(rs[rid], phase=Phase.DRAINING, draining_since=now)
    live = [r for r in rs.values() if r.phase in LIVE]

    if svc.deleting:
        for r in rs.values():
            if r.phase is not Phase.ENDED and not r.cancel_requested:
                cancel.add(r.id)
        out.delete = all(r.phase is Phase.ENDED for r in rs.values())
        return _finish(out, rs, cancel)

    out.desired, out.low_since = wanted_replicas(svc, list(rs.values()), now)
    backoff_ok = out.failures == 0 or _secs(now, out.last_failure_at) >= min(timing.max_backoff_s,
                                                                               2.0 ** out.failures)
    if svc.next_generation is not None:
        new = [r for r in live if r.generation == svc.next_generation]
        old = [r for r in live if r.generation != svc.next_generation]
        if failed_new:
            for r in new:
                rs[r.id] = _drain(r, now, "rolling update failed")
            out.rollout, out.rollout_message = "failed", "version generation %d did not start: %s" % (
                svc.next_generation, failed_new[0].message)
            out.events.append("rolling update failed; the old version keeps serving")
        elif svc.next_weight is not None:
            _plan_gray(svc, out, rs, new, [r for r in old if r.generation == svc.generation], now, backoff_ok)
            for r in old:
                if r.generation != svc.generation:
                    rs[r.id] = _drain(r, now, "not the service's version")
        elif not old:
            out.rollout = "done"
            out.events.append("rolling update to generation %d done" % svc.next_generation)
        elif any(r.phase is not Phase.READY for r in new):
            pass                       # wait for the new replica
        elif len(new) + len(old) > out.desired:
            victim = sorted(old, key=_drain_order)[0]
            rs[victim.id] = _drain(victim, now, "replaced by the new version")
        else:
            out.submit.append(svc.next_generation)
        return _finish(out, rs, cancel)

    current = [r for r in live if r.generation == svc.generation]
    for r in live:
        if r.generation != svc.generation:
            rs[r.id] = _drain(r, now, "not the service's version")
    if len(current) < out.desired and backoff_ok:
        # after a failed start, one at a time
        n = out.desired - len(current) if out.failures == 0 else 1
        out.submit.extend([svc.generation] * n)
    elif len(current) > out.desired:
        for victim in sorted(current, key=_drain_order)[:len(current) - out.desired]:
            rs[victim.id] = _drain(victim, now, "scaled down")
    return _finish(out, rs, cancel)


def _plan_gray(svc: ServiceView, out: ServicePlan, rs: dict[str, ReplicaView], new: list[ReplicaView],
               current: list[ReplicaView], now: dt.datetime, backoff_ok: bool) -> None:
    """A gray release: ``canary_replicas`` of the next version beside the current version's
    replica count; the router splits requests by weight. Nothing is replaced."""
    if len(new) < svc.canary_replicas and backoff_ok:
        out.submit.append(svc.next_generation)
    if len(current) < out.desired and backoff_ok:
        out.submit.extend([svc.generation] * (out.desired - len(current) if out.failures == 0 else 1))
    elif len(current) > out.desired:
        for victim in sorted(current, key=_drain_order)[:len(current) - out.desired]:
            rs[victim.id] = _drain(victim, now, "scaled down")


def _finish(out: ServicePlan, rs: dict[str, ReplicaView], cancel: set[str]) -> ServicePlan:
    for r in rs.values():
        # draining replicas that never served go at once
        if r.phase is Phase.DRAINING and not r.cancel_requested and r.id not in cancel and (
                r.ready_at is None):
            cancel.add(r.id)
    out.cancel = sorted(cancel)
    out.replicas = [replace(r, cancel_requested=True) if r.id in cancel else r for r in rs.values()]
    return out
