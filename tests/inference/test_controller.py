"""The controller's decisions as tables: readiness, replacement, autoscaling, rolling updates,
deletion (pure: no cluster, no clock)."""
from __future__ import annotations

import datetime as dt

import pytest

from inference.controller import Phase, ReplicaView, ServiceView, Timing, plan_service, wanted_replicas
from inference.probe import ProbeResult
from slurm.states import JobState

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
OK = ProbeResult(True, 200, "ready", inflight_seconds=0.0)
DOWN = ProbeResult(False, None, "connection refused")
TIMING = Timing(drain_grace_s=2.0, failure_threshold=3, startup_timeout_s=60, unhealthy_timeout_s=30)


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def rep(rid="r1", phase=Phase.READY, gen=1, job=JobState.RUNNING, probe=OK, **kw) -> ReplicaView:
    kw.setdefault("created_at", T0)
    kw.setdefault("started_at", T0 if phase is not Phase.PENDING else None)
    kw.setdefault("ready_at", T0 if phase in (Phase.READY, Phase.UNHEALTHY, Phase.DRAINING) else None)
    return ReplicaView(id=rid, generation=gen, phase=phase, job_state=job, probe=probe, **kw)


def svc(**kw) -> ServiceView:
    base = dict(id="s", generation=1, min_replicas=1, max_replicas=1, desired=1)
    base.update(kw)
    return ServiceView(**base)


def phases(plan):
    return {r.id: r.phase for r in plan.replicas}


@pytest.mark.parametrize("replica, phase, cancel", [
    (rep(phase=Phase.PENDING, job=JobState.PENDING, probe=None), Phase.PENDING, False),
    (rep(phase=Phase.PENDING, job=JobState.RUNNING, probe=None), Phase.STARTING, False),
    (rep(phase=Phase.STARTING, probe=ProbeResult(False, 503, "loading")), Phase.STARTING, False),
    (rep(phase=Phase.STARTING, probe=OK), Phase.READY, False),
    # not ready 60 s after its job started: replaced
    (rep(phase=Phase.STARTING, probe=DOWN, started_at=at(-61)), Phase.DRAINING, True),
    # READY: two failed probes keep it, the third takes it out
    (rep(probe=DOWN, probe_failures=1), Phase.READY, False),
    (rep(probe=DOWN, probe_failures=2), Phase.UNHEALTHY, False),
    (rep(phase=Phase.UNHEALTHY, probe=OK, unhealthy_since=at(-5)), Phase.READY, False),
    (rep(phase=Phase.UNHEALTHY, probe=DOWN, unhealthy_since=at(-31)), Phase.DRAINING, True),
    (rep(job=JobState.CANCELLED, probe=None), Phase.ENDED, False),
    (rep(job=None, probe=None, created_at=at(-5)), Phase.READY, False),    # just submitted, not seen yet
    (rep(job=None, probe=None, created_at=at(-61)), Phase.ENDED, False),   # Slurm forgot it
    # draining: cancelled after the grace period (routers have stopped using it by then)
    (rep(phase=Phase.DRAINING, draining_since=at(-1)), Phase.DRAINING, False),
    (rep(phase=Phase.DRAINING, draining_since=at(-2)), Phase.DRAINING, True),
])
def test_replica_phases(replica, phase, cancel):
    others = [rep("r2")] if replica.phase is not Phase.DRAINING else []
    n = 1 + len(others) - (replica.phase is Phase.DRAINING)
    plan = plan_service(svc(desired=n, min_replicas=n, max_replicas=n), [replica] + others, T0, TIMING)
    assert phases(plan)["r1"] is phase
    assert ("r1" in plan.cancel) is cancel


def test_a_replica_whose_job_ended_is_replaced_at_once_and_a_failed_start_backs_off():
    plan = plan_service(svc(desired=2, min_replicas=2, max_replicas=2),
                        [rep("a"), rep("b", job=JobState.CANCELLED, probe=None)], T0, TIMING)
    assert phases(plan)["b"] is Phase.ENDED and plan.submit == [1] and plan.failures == 0
    # a replica that never became ready counts as a failed start: the next one waits 2**n s
    never = rep("c", phase=Phase.STARTING, job=JobState.FAILED, probe=None, ready_at=None)
    plan = plan_service(svc(), [never], T0, TIMING)
    assert plan.failures == 1 and plan.submit == [] and "see its log" in plan.replicas[0].message
    plan = plan_service(svc(failures=1, last_failure_at=at(-2.1)), [], T0, TIMING)
    assert plan.submit == [1]


@pytest.mark.parametrize("loads, desired, low_since, now, want, want_low", [
    ([3.0], 1, None, 0, 2, None),             # 3 in flight on 1 replica, target 2: scale up at once
    ([9.0, 9.0], 2, None, 0, 3, None),        # capped at max 3
    ([0.5, 0.5], 2, None, 0, 2, T0),          # low: the clock starts
    ([0.5, 0.5], 2, T0, 9.9, 2, T0),          # not long enough
    ([0.5, 0.5], 2, T0, 10, 1, None),         # low for 10 s: one replica fewer
    ([2.0, 2.0], 2, T0, 10, 2, None),         # exactly on target: stays
    ([None], 1, None, 0, 1, None),            # no sample yet: no change
])
def test_autoscaler(loads, desired, low_since, now, want, want_low):
    s = svc(min_replicas=1, max_replicas=3, desired=desired, target_inflight=2.0, scale_down_delay_s=10,
            low_since=low_since)
    rs = [rep("r%d" % i, avg_inflight=x) for i, x in enumerate(loads)]
    assert wanted_replicas(s, rs, at(now)) == (want, want_low)


def test_load_is_the_rate_of_the_inflight_counter():
    r = rep(last_inflight_seconds=10.0, last_sample_at=at(-2),
            probe=ProbeResult(True, 200, "ready", inflight_seconds=16.0))
    plan = plan_service(svc(), [r], T0, TIMING)
    assert plan.replicas[0].avg_inflight == pytest.approx(3.0) and plan.replicas[0].last_inflight_seconds == 16.0


def test_scale_down_drains_the_least_useful_replica_first():
    # (probe=None: no new sample this cycle, the last averages stand)
    rs = [rep("busy", avg_inflight=2.0, probe=None), rep("idle", avg_inflight=0.0, probe=None), rep("new", phase=Phase.STARTING, probe=None,
                                                                              ready_at=None)]
    plan = plan_service(svc(min_replicas=1, max_replicas=1, desired=1), rs, T0, TIMING)
    p = phases(plan)
    assert p == {"busy": Phase.READY, "idle": Phase.DRAINING, "new": Phase.DRAINING}
    assert plan.cancel == ["new"]          # never served: cancelled now; "idle" after the grace period


def test_rolling_update_one_replica_at_a_time():
    s = svc(min_replicas=2, max_replicas=2, desired=2, next_generation=2)
    old = [rep("o1"), rep("o2")]
    # 1. surge: one new replica
    plan = plan_service(s, old, T0, TIMING)
    assert plan.submit == [2] and not plan.cancel
    # 2. it starts: wait
    new = rep("n1", gen=2, phase=Phase.STARTING, probe=ProbeResult(False, 503, "loading"), ready_at=None)
    plan = plan_service(s, old + [new], T0, TIMING)
    assert plan.submit == [] and set(phases(plan).values()) == {Phase.READY, Phase.STARTING}
    # 3. it is ready: one old replica drains
    plan = plan_service(s, old + [replace_probe(new, OK)], T0, TIMING)
    assert sorted(phases(plan).values(), key=lambda p: p.value) == [Phase.DRAINING, Phase.READY, Phase.READY]
    assert plan.submit == [] and plan.rollout is None
    # 4. the last old one gone: done
    plan = plan_service(s, [rep("n1", gen=2), rep("n2", gen=2), rep("o2", phase=Phase.DRAINING, draining_since=at(-1))],
                        T0, TIMING)
    assert plan.rollout == "done"


def replace_probe(r, probe):
    from dataclasses import replace
    return replace(r, probe=probe)


def test_a_failed_rollout_stops_and_the_old_version_keeps_serving():
    s = svc(next_generation=2)
    dead = rep("n1", gen=2, phase=Phase.STARTING, job=JobState.FAILED, probe=None, ready_at=None)
    plan = plan_service(s, [rep("o1"), dead], T0, TIMING)
    assert plan.rollout == "failed" and "did not start" in plan.rollout_message
    assert phases(plan) == {"o1": Phase.READY, "n1": Phase.ENDED} and plan.submit == []


def test_deleting_cancels_everything_then_the_service_goes():
    s = svc(deleting=True)
    plan = plan_service(s, [rep("a"), rep("b", phase=Phase.PENDING, job=JobState.PENDING, probe=None)], T0, TIMING)
    assert plan.cancel == ["a", "b"] and not plan.delete
    plan = plan_service(s, [rep("a", job=JobState.CANCELLED, cancel_requested=True)], T0, TIMING)
    assert plan.delete


def test_a_gray_release_runs_canaries_beside_the_current_version_and_replaces_nothing():
    s = svc(min_replicas=2, max_replicas=2, desired=2, next_generation=2, next_weight=10)
    old = [rep("o1"), rep("o2")]
    plan = plan_service(s, old, T0, TIMING)
    assert plan.submit == [2] and not plan.cancel and plan.rollout is None
    canary = rep("n1", gen=2)
    plan = plan_service(s, old + [canary], T0, TIMING)
    assert plan.submit == [] and set(phases(plan).values()) == {Phase.READY} and plan.rollout is None
    # a current replica that ended is replaced with the current version, not the canary's
    plan = plan_service(s, [old[0], rep("o2", job=JobState.FAILED, probe=None), canary], T0, TIMING)
    assert plan.submit == [1]
    # a canary that fails to start ends the gray release; the current version keeps serving
    dead = rep("n1", gen=2, phase=Phase.STARTING, job=JobState.FAILED, probe=None, ready_at=None)
    plan = plan_service(s, old + [dead], T0, TIMING)
    assert plan.rollout == "failed" and phases(plan) == {"o1": Phase.READY, "o2": Phase.READY, "n1": Phase.ENDED}
    # weight 100: a rolling update in which the canary already counts as a new replica
    plan = plan_service(svc(min_replicas=2, max_replicas=2, desired=2, next_generation=2), old + [canary], T0, TIMING)
    assert sorted(p.value for p in phases(plan).values()) == ["DRAINING", "READY", "READY"] and plan.submit == []
