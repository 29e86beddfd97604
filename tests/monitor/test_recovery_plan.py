"""The recovery plan from one look at Slurm (pure)."""
import datetime as dt

from monitor.recovery import FORGET_AFTER, Memory, NodeCondition, condition_of, plan
from slurm.cluster import Node, NodeState as S
from slurm.jobs import QueuedJob
from slurm.states import JobState as J

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)


def node(name, state=S.IDLE, reason="", responding=True):
    return Node(name, ("gpu-1card",), state, responding, 8, 0, 32000, 1, 0, "p40", reason)


def job(jid, state=J.RUNNING, nodes="g1n1", restarts=0, requeue=True, reason="None", eligible=None, user="alice"):
    return QueuedJob(jid, state, "" if reason == "None" else reason, nodes, restarts, requeue, user, "", eligible)


HARD = "aiportal: gpu_devices: 0 (limit 1)"
SOFT = "aiportal: scratch_free: 0MB (limit 1024MB)"


def test_conditions():
    assert condition_of(node("a")) == (NodeCondition.UP, "")
    assert condition_of(node("a", S.MIXED)) == (NodeCondition.UP, "")
    assert condition_of(node("a", S.DRAINING, HARD)) == (NodeCondition.DRAIN, HARD)
    assert condition_of(node("a", S.DRAINED, "admin")) == (NodeCondition.DRAIN, "admin")
    assert condition_of(node("a", S.DOWN, "Not responding", False)) == (NodeCondition.DOWN, "Not responding")
    assert condition_of(node("a", S.DOWN, "", False))[0] is NodeCondition.DOWN


def test_jobs_on_a_hard_failed_node_are_requeued_or_stopped():
    p = plan([node("g1n1", S.DRAINING, HARD), node("g1n2", S.MIXED)],
             {"10": job("10"), "11": job("11", requeue=False), "12": job("12", nodes="g1n2")}, Memory(), NOW)
    assert [a.job.job_id for a in p.requeue] == ["10"]
    assert [a.job.job_id for a in p.stop] == ["11"]
    assert p.requeue[0].node == "g1n1" and HARD in p.requeue[0].why
    assert p.requeue[0].key == "requeue:10:0" and p.stop[0].key == "stop:11:0"


def test_soft_failures_and_admin_drains_let_jobs_finish():
    p = plan([node("g1n1", S.DRAINING, SOFT), node("g1n2", S.DRAINING, "replacing GPU (root-admin)")],
             {"10": job("10"), "12": job("12", nodes="g1n2")}, Memory(), NOW)
    assert p.requeue == [] and p.stop == []


def test_requeue_hold_is_released_but_not_a_users_own_begin_time():
    soon = NOW + dt.timedelta(seconds=121)
    later = NOW + dt.timedelta(hours=2)
    jobs = {"20": job("20", J.PENDING, "", restarts=1, reason="BeginTime", eligible=soon),
            "21": job("21", J.PENDING, "", restarts=1, reason="BeginTime", eligible=later),
            "22": job("22", J.PENDING, "", restarts=0, reason="BeginTime", eligible=soon),
            "23": job("23", J.PENDING, "", restarts=2, reason="Priority", eligible=NOW),
            "24": job("24", J.PENDING, "", restarts=1, reason="None", eligible=soon),    # not scheduled yet
            "25": job("25", J.PENDING, "", restarts=1, reason="BeginTime", eligible=None)}
    p = plan([node("g1n1")], jobs, Memory(), NOW, release_within_s=300)
    assert [j.job_id for j in p.release] == ["20", "24", "25"]


def test_each_requeue_is_a_note_with_its_cause_and_a_stable_key():
    mem = Memory()
    plan([node("g1n1", S.MIXED)], {"30": job("30")}, mem, NOW)
    assert mem.last_node == {"30": ("g1n1", True, "alice")}
    p = plan([node("g1n1", S.DOWN, "Not responding", False)],
             {"30": job("30", J.PENDING, "", restarts=1, reason="BeginTime",
                        eligible=NOW + dt.timedelta(seconds=120))}, mem, NOW)
    (note,) = p.notes
    assert note.key == "requeue:30:0" and note.kind == "requeued" and note.node == "g1n1"
    assert "node g1n1 went down (Not responding)" in note.message and "released" in note.message


def test_a_no_requeue_job_that_vanished_with_its_node_is_a_note():
    mem = Memory()
    plan([node("g1n1", S.MIXED)], {"40": job("40", requeue=False), "41": job("41")}, mem, NOW)
    p = plan([node("g1n1", S.DOWN, "Not responding", False)], {}, mem, NOW)
    assert [(n.job_id, n.kind, n.key, n.user) for n in p.notes] == [("40", "node_failed", "nodefail:40", "alice")]
    # the no-requeue job is forgotten at once; the requeueable one only after FORGET_AFTER cycles
    # away (while Slurm requeues it, squeue's default states may leave it out of an answer)
    assert mem.last_node == {"41": ("g1n1", True, "alice")}
    for _ in range(FORGET_AFTER - 1):
        plan([node("g1n1")], {}, mem, NOW)
    assert mem.last_node == {} and mem.missing == {}


def test_a_requeue_noted_after_the_job_was_missing_from_one_answer_still_names_its_node():
    mem = Memory()
    plan([node("g4n1", S.MIXED)], {"60": job("60", nodes="g4n1")}, mem, NOW)
    plan([node("g4n1", S.DOWN, "Not responding", False)], {}, mem, NOW)      # REQUEUED: not listed
    back = job("60", state=J.PENDING, restarts=1, nodes="")
    p = plan([node("g4n1", S.DOWN, "Not responding", False)], {"60": back}, mem, NOW)
    [note] = [n for n in p.notes if n.kind == "requeued"]
    assert note.node == "g4n1" and "g4n1" in note.message, note


def test_a_job_that_finished_normally_is_no_note():
    mem = Memory()
    plan([node("g1n1", S.MIXED)], {"50": job("50", requeue=False)}, mem, NOW)
    assert plan([node("g1n1")], {}, mem, NOW).notes == []


def test_a_no_requeue_job_gone_from_a_hard_failed_node_is_one_stop_note():
    mem = Memory()
    plan([node("g1n1", S.MIXED)], {"60": job("60", requeue=False)}, mem, NOW)
    p = plan([node("g1n1", S.DRAINING, HARD)], {"60": job("60", requeue=False)}, mem, NOW)
    assert [a.key for a in p.stop] == ["stop:60:0"]
    p = plan([node("g1n1", S.DRAINED, HARD)], {}, mem, NOW)
    assert [(n.key, n.kind) for n in p.notes] == [("stop:60:0", "node_failed")]     # same key as the action


def test_a_job_held_because_its_launch_failed_is_released():
    """Slurm requeues and holds a job whose launch failed on a node (and drains that node), e.g.
    a "Duplicate jobid" after a controller restart: released, it starts on another node."""
    from monitor.recovery import LAUNCH_FAILED_HELD
    jobs = {"30": job("30", J.PENDING, "", restarts=1, reason=LAUNCH_FAILED_HELD, eligible=None),
            "31": job("31", J.PENDING, "", restarts=0, reason="JobHeldUser", eligible=None)}
    p = plan([], jobs, Memory(), NOW)
    assert [j.job_id for j in p.release] == ["30"]
