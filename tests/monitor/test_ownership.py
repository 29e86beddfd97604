"""Drain and resume with ownership: a table of node states, reasons, verdicts and pass counts."""
import pytest

from monitor.checks import Status, Verdict
from monitor.ownership import DRAIN_PREFIX, Action, decide, owned_by_aiportal
from slurm.cluster import NodeState as S

OK = [Verdict("gpu_devices", Status.PASS, "4", "4"), Verdict("munge", Status.PASS, "ok", "round trip")]
BAD = [Verdict("gpu_devices", Status.FAIL, "3", "4"), Verdict("scratch_free", Status.FAIL, "0MB", "1024MB")]
OURS = "aiportal: gpu_devices: 3 (limit 4)"
ADMIN = "replacing GPU 2 (root-admin)"


@pytest.mark.parametrize("state,reason,verdicts,before,action,after", [
    # failing: drain a node in service with the first failure as the reason
    (S.IDLE, "", BAD, 5, Action.DRAIN, 0),
    (S.MIXED, "", BAD, 0, Action.DRAIN, 0),
    (S.ALLOCATED, "", BAD, 0, Action.DRAIN, 0),
    # already drained by us, or by an admin: nothing (and the pass count restarts)
    (S.DRAINED, OURS, BAD, 1, Action.NONE, 0),
    (S.DRAINING, ADMIN, BAD, 1, Action.NONE, 0),
    # slurmctld unreachable: state unknown, nothing done
    (None, "", BAD, 0, Action.NONE, 0),
    # passing: resume our drain after N=3 passes in a row, exactly
    (S.DRAINED, OURS, OK, 0, Action.NONE, 1),
    (S.DRAINED, OURS, OK, 1, Action.NONE, 2),
    (S.DRAINED, OURS, OK, 2, Action.RESUME, 3),
    (S.DRAINING, OURS, OK, 7, Action.RESUME, 8),
    # an admin's drain is never resumed, however long checks pass
    (S.DRAINED, ADMIN, OK, 100, Action.NONE, 101),
    (S.DRAINED, "aiportal-test: drain test", OK, 100, Action.NONE, 101),
    # Slurm's own "Duplicate jobid" drain (a controller restarted from older state): resumed
    # like ours once the checks pass; a failing node stays drained
    (S.DRAINED, "Duplicate jobid", OK, 1, Action.NONE, 2),
    (S.DRAINED, "Duplicate jobid", OK, 2, Action.RESUME, 3),
    (S.DRAINING, "Duplicate jobid", BAD, 5, Action.NONE, 0),
    (S.DRAINED, "Duplicate jobid on g1n1 (root-admin)", OK, 100, Action.NONE, 101),
    # healthy and in service
    (S.IDLE, "", OK, 0, Action.NONE, 1),
])
def test_decide(state, reason, verdicts, before, action, after):
    d = decide(state, reason, verdicts, before, resume_after=3)
    assert (d.action, d.passes) == (action, after)
    if action is Action.DRAIN:
        assert d.reason == "aiportal: gpu_devices: 3 (limit 4)"


def test_reason_is_one_short_line():
    v = Verdict("shared_writable", Status.FAIL, "unknown\nvalue", "5s")
    assert v.reason() == "aiportal: shared_writable: unknown value (limit 5s)"
    assert len(Verdict("x", Status.FAIL, "v" * 500, "1").reason()) == 200


@pytest.mark.parametrize("reason,ours", [
    ("aiportal: gpu_devices: 3 (limit 4)", True),
    ("aiportal:", True),
    ("  aiportal: gpu_devices: 3 (limit 4)", True),      # leading blanks: never written by anyone on purpose
    ("\taiportal: x", True),
    # an admin's reasons, however close: never resumed by the monitor
    ("AIPORTAL: replacing GPU 2", False),
    ("Aiportal: x", False),
    ("aiportal : x", False),
    ("aiportal-test: drain test", False),
    ("aiportal x", False),
    ("replacing GPU 2 (aiportal: later)", False),
    ("", False),
    ("   ", False),
])
def test_owned_by_aiportal(reason, ours):
    assert owned_by_aiportal(reason) is ours


def test_every_reason_the_monitor_writes_is_its_own():
    v = Verdict("gpu_devices", Status.FAIL, "3", "4")
    assert v.reason().startswith(DRAIN_PREFIX) and owned_by_aiportal(v.reason())


def test_a_leading_blank_does_not_hide_our_drain_from_resume():
    d = decide(S.DRAINED, " " + OURS, OK, 2, resume_after=3)
    assert d.action is Action.RESUME
    assert decide(S.DRAINED, OURS.upper(), OK, 100, resume_after=3).action is Action.NONE
