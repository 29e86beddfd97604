"""Job state table and the squeue/sacct parsers."""
import logging

import pytest

from slurm.errors import SlurmParseError
from slurm.jobs import (SEP, SQUEUE_FIELDS, expand_output_path, failed_dependencies, parse_exit_code, parse_sacct, parse_squeue,
                        squeue_format, tres_gpus)
from slurm.states import TERMINAL, JobState, parse_job_state


@pytest.mark.parametrize("text, state", [
    ("PENDING", JobState.PENDING), ("RUNNING", JobState.RUNNING), ("COMPLETED", JobState.COMPLETED),
    ("FAILED", JobState.FAILED), ("CANCELLED by 3001", JobState.CANCELLED), ("CANCELLED+", JobState.CANCELLED),
    ("TIMEOUT", JobState.TIMEOUT), ("NODE_FAIL", JobState.NODE_FAIL), ("PREEMPTED", JobState.PREEMPTED),
    ("REQUEUED", JobState.REQUEUED), ("OUT_OF_MEMORY", JobState.OUT_OF_MEMORY), ("REQUEUE_HOLD", JobState.REQUEUE_HOLD),
    ("PD", JobState.PENDING), ("R", JobState.RUNNING), ("CG", JobState.COMPLETING), ("OOM", JobState.OUT_OF_MEMORY),
    ("completed", JobState.COMPLETED),
])
def test_state_table(text, state):
    assert parse_job_state(text) is state


def test_unknown_state_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_job_state("EXPLODED") is JobState.UNKNOWN
    assert "unknown Slurm job state 'EXPLODED'" in caplog.text


def test_terminal_and_active():
    assert JobState.COMPLETED.terminal and JobState.NODE_FAIL.terminal
    assert not JobState.REQUEUED.terminal and JobState.REQUEUED.active
    assert not JobState.SUBMITTING.active and JobState.SUBMITTING not in TERMINAL


#: Submit, Start, End of an sacct line that does not give them
TIMES = ("2026-11-27T11:00:00", "2026-11-27T11:00:05", "2026-11-27T11:02:00")


def L(*cols):
    """One line of ``sacct -P`` with SACCT_FIELDS (the three times added where not given)."""
    return SEP.join(cols + TIMES if len(cols) == 8 else cols)


def Q(*cols):
    """One line of ``squeue -h --array -O`` + squeue_format(): SEP after every field (SubmitTime
    and StartTime added where a line of 12 fields does not give them)."""
    if len(cols) == 12:
        cols += ("2026-11-27T11:00:00", "N/A")
    if len(cols) == 14:
        cols += ("gpu-1card", "cpu=8,mem=32000M,node=1,billing=8,gres/gpu=1,gres/gpu:p40=1")
    return "".join(c + SEP for c in cols)


# ``squeue --noheader --array --states=all --Format <squeue_format()>`` (fields: JobArrayID
# StateCompact Reason NodeList RestartCnt Requeue UserName Comment EligibleTime Name StdOut
# Dependency); the last two lines from the dev cluster (Slurm 22.05, StdOut and Dependency added
# from other runs): 1323 was requeued once, then completed; squeue shows an --output pattern as
# given, and "(null)" for no dependency
RECORDED = "\n".join([
    Q("12", "R", "None", "g1n2", "1", "1", "alice", "aiportal:u1", "2026-11-27T11:52:32", "train",
      "/srv/aiportal/shared/users/alice/jobs/u1/logs/slurm-12.out", "(null)"),
    Q("13_2", "PD", "Dependency", "", "0", "0", "bob", "(null)", "Unknown", "my sweep, lr=1e-3", "/home/bob/%A_%a.log",
      "afterok:12(unfulfilled)"),
    Q("14", "PD", "launch failed requeued held", "", "3", "1", "carol", "(null)", "N/A", "x", "/dev/null", "(null)"),
    Q("657", "PD", "DependencyNeverSatisfied", "", "0", "1", "alice", "(null)", "Unknown", "wrap", "/dev/null",
      "afterok:655(failed),afterok:656(unfulfilled),afterany:656(unfulfilled)"),
    "1323\x1fCD\x1fNone\x1fg1n1\x1f1\x1f1\x1falice\x1faiportal:5b2348eb-6b21-4548-8fee-94a537975d2a"
    "\x1f2026-11-27T14:12:11\x1fcifar10-1card\x1f/srv/aiportal/shared/users/alice/jobs/5b2348eb/logs/slurm-1323.out"
    "\x1f(null)\x1f2026-11-27T14:10:00\x1f2026-11-27T14:10:02\x1fgpu-1card\x1fcpu=8,mem=32000M,node=1,billing=8,"
    "gres/gpu=1,gres/gpu:p40=1\x1f",
    "1336\x1fCA\x1fJobHeldUser\x1f\x1f0\x1f1\x1falice\x1f(null)\x1fN/A\x1fby-hand\x1f"
    "/srv/aiportal/shared/users/alice/logs-%x-%j.txt\x1f(null)\x1f2026-11-27T14:20:00\x1fN/A\x1fgpu-4card\x1f"
    "cpu=48,mem=96000M,node=1,billing=48,gres/gpu=4\x1f",
]) + "\n"


def test_squeue_format_is_long_names_unpadded_each_followed_by_sep():
    assert squeue_format().split(",") == ["%s:0%s" % (f, SEP) for f in SQUEUE_FIELDS]
    assert "RestartCnt" in SQUEUE_FIELDS and "Name" in SQUEUE_FIELDS


def test_parse_squeue():
    got = parse_squeue(RECORDED)
    assert list(got) == ["12", "13_2", "14", "657", "1323", "1336"]
    a = got["12"]
    assert (a.state, a.reason, a.nodes, a.user, a.comment, a.name, a.restarts) == (
        JobState.RUNNING, "", "g1n2", "alice", "aiportal:u1", "train", 1)
    assert got["13_2"].reason == "Dependency" and got["13_2"].comment == "" and got["13_2"].restarts == 0


@pytest.mark.parametrize("jid, field, value", [
    ("13_2", "name", "my sweep, lr=1e-3"),                  # spaces and a comma: whole
    ("14", "reason", "launch failed requeued held"),
    ("657", "reason", "DependencyNeverSatisfied"),
    ("657", "dependency", "afterok:655(failed),afterok:656(unfulfilled),afterany:656(unfulfilled)"),
    ("13_2", "dependency", "afterok:12(unfulfilled)"),
    ("1323", "dependency", ""),
    ("14", "state", JobState.PENDING),
    ("14", "restarts", 3),
    ("1323", "state", JobState.COMPLETED),
    ("1323", "restarts", 1),
    ("1323", "nodes", "g1n1"),
    ("1323", "name", "cifar10-1card"),
    ("1323", "exit_code", None),                            # squeue has no exit codes
    ("1336", "state", JobState.CANCELLED),
    ("1336", "reason", "JobHeldUser"),
    ("1336", "nodes", ""),
    ("1336", "comment", ""),
    ("1336", "stdout", "/srv/aiportal/shared/users/alice/logs-%x-%j.txt"),
    ("13_2", "stdout", "/home/bob/%A_%a.log"),
])
def test_parse_squeue_fields(jid, field, value):
    assert getattr(parse_squeue(RECORDED)[jid], field) == value


@pytest.mark.parametrize("line, match", [
    (Q("12", "R", "None", "g1n1", "x", "1", "alice", "", "N/A", "t", "/x", ""), "restart count 'x' is not a number"),
    (SEP.join(("12", "RUNNING", "None", "g1n1", "alice", "aiportal:u1", "train")), "expected 16 squeue fields"),
    (Q("12", "R"), "expected 16 squeue fields"),
])
def test_parse_squeue_refuses_other_output(line, match):
    with pytest.raises(SlurmParseError, match=match):
        parse_squeue(line)


@pytest.mark.parametrize("text, failed", [
    ("", ()), ("(null)", ()),
    ("afterok:645(unfulfilled)", ()),
    ("afterok:645(failed)", ("645",)),                                   # the dev cluster, after 645 failed
    ("afterok:655(failed),afterok:656(unfulfilled),afterany:656(unfulfilled)", ("655",)),   # all must hold
    ("afterok:1(failed),afternotok:2(failed)", ("1", "2")),
    ("afterok:1:2(failed)", ("1", "2")),
    ("afterok:77_*(failed)", ("77",)), ("afterok:77_3(failed)", ("77",)),  # array jobs by their id
    ("after:5+10(failed)", ("5",)),
    ("afterok:1(failed)?afterok:2(unfulfilled)", ()),                    # any one would do: not yet
    ("afterok:1(failed)?afterany:2(failed)", ("1", "2")),
    ("singleton(unfulfilled)", ()),
    ("afterok:9(fulfilled)", ()),
])
def test_failed_dependencies(text, failed):
    assert failed_dependencies(text) == failed


def test_parse_sacct_last_run_wins():
    text = "\n".join([L("20", "NODE_FAIL", "0:0", "g4n1", "alice", "", "None", "a"),
                      L("20", "COMPLETED", "0:0", "g4n2", "alice", "", "None", "a"),
                      L("21", "FAILED", "3:0", "g1n1", "alice", "", "NonZeroExitCode", "b")])
    got = parse_sacct(text)
    assert got["20"].state is JobState.COMPLETED and got["20"].nodes == "g4n2"
    assert (got["21"].exit_code, got["21"].signal) == (3, 0)


@pytest.mark.parametrize("text, expected", [("0:0", (0, 0)), ("1:0", (1, 0)), ("0:15", (0, 15)), ("", (None, None))])
def test_exit_code(text, expected):
    assert parse_exit_code(text) == expected


def test_bad_lines():
    with pytest.raises(SlurmParseError, match="expected 16 squeue fields"):
        parse_squeue("12 RUNNING")
    with pytest.raises(SlurmParseError, match="CODE:SIGNAL"):
        parse_exit_code("x:y")


def test_sacct_has_no_restart_count():
    got = parse_sacct(L("20", "COMPLETED", "0:0", "g4n2", "alice", "", "None", "a"))
    assert got["20"].restarts is None


def test_recovery_queue_parse():
    import datetime as dt

    from slurm.jobs import parse_squeue_recovery
    line = Q("952", "PD", "BeginTime", "", "1", "1", "alice", "(null)", "2026-11-27T11:52:32", "train", "/x/952.out", "(null)")
    line2 = Q("953", "R", "None", "g1n1", "0", "0", "bob", "aiportal:x", "N/A", "serve it", "/x/953.out", "(null)")
    got = parse_squeue_recovery(line + "\n" + line2 + "\n")
    a, b = got["952"], got["953"]
    assert (a.name, b.name) == ("train", "serve it")
    assert (a.state, a.reason, a.nodes, a.restarts, a.requeue, a.comment) == (JobState.PENDING, "BeginTime", "", 1, True, "")
    assert a.eligible == dt.datetime(2026, 11, 27, 11, 52, 32).astimezone()
    assert (b.state, b.reason, b.nodes, b.requeue, b.eligible, b.comment) == (JobState.RUNNING, "", "g1n1", False, None,
                                                                             "aiportal:x")


@pytest.mark.parametrize("pattern, job_id, want", [
    ("/a/slurm-12.out", "12", "/a/slurm-12.out"),                       # the default: squeue shows it filled in
    ("/a/logs-%x-%j.txt", "12", "/a/logs-train-12.txt"),
    ("/a/%A_%a.log", "12_3", "/a/12_3.log"),
    ("/a/%A_%4a.log", "12_3", "/a/12_0003.log"),                        # zero padding
    ("/a/%u/%N-%J.%s.%t.%n", "7", "/a/alice/g1n1-7.batch.0.0"),
    ("/a/100%%-%j", "7", "/a/100%-7"),
    ("/a/%j.log", "12_3", None),                                        # a task's own id: squeue does not show it
    ("/a/%q.log", "7", None),                                           # not a Slurm symbol
    ("/a/50%", "7", None),
])
def test_expand_output_path(pattern, job_id, want):
    assert expand_output_path(pattern, job_id, name="train", user="alice", nodes="g1n1,g1n2") == want


def test_squeue_times_are_slurms_and_a_pending_jobs_estimate_is_not_a_start():
    import datetime as dt
    got = parse_squeue(RECORDED + Q("15", "PD", "Priority", "", "0", "1", "alice", "(null)", "N/A", "x", "/x", "(null)",
                                    "2026-11-27T14:30:00", "2026-11-27T15:00:00") + "\n")
    assert got["1323"].submitted == dt.datetime(2026, 11, 27, 14, 10).astimezone()
    assert got["1323"].started == dt.datetime(2026, 11, 27, 14, 10, 2).astimezone()
    assert got["1336"].started is None and got["15"].started is None
    assert got["15"].submitted == dt.datetime(2026, 11, 27, 14, 30).astimezone()


def test_sacct_runs_keep_every_record_with_its_times_and_a_completed_job_has_no_stale_reason():
    import datetime as dt
    from slurm.jobs import parse_sacct_runs
    text = "\n".join([L("30", "PENDING", "0:0", "", "alice", "aiportal:a", "None", "lost", "2026-11-27T10:00:00",
                        "Unknown", "Unknown"),
                      L("30", "COMPLETED", "0:0", "g1n1", "bob", "aiportal:b", "Dependency", "new")])
    runs = parse_sacct_runs(text)
    assert [(r.comment, r.state, r.started) for r in runs] == [
        ("aiportal:a", JobState.PENDING, None),
        ("aiportal:b", JobState.COMPLETED, dt.datetime(2026, 11, 27, 11, 0, 5).astimezone())]
    assert runs[1].reason == "" and runs[1].ended == dt.datetime(2026, 11, 27, 11, 2).astimezone()
    assert parse_sacct(text)["30"].comment == "aiportal:b"       # the last record wins


@pytest.mark.parametrize("tres, gpus", [
    ("cpu=1,mem=2000M,node=1,billing=1,gres/gpu=2,gres/gpu:p40=2", 2),   # squeue 22.05, --gres=gpu:p40:2
    ("cpu=1,mem=2000M,node=1,billing=1,gres/gpu=3", 3),                  # --gpus=3
    ("cpu=96,mem=0,node=2,billing=96,gres/gpu=8", 8),                    # two 4-GPU nodes
    ("cpu=1,mem=2000M,node=1,billing=1", 0), ("N/A", 0), ("", 0),
    ("cpu=1,gres/gpumem=100,node=1", 0),
])
def test_gpus_from_squeues_tres(tres, gpus):
    assert tres_gpus(tres) == gpus


def test_squeue_rows_carry_partition_and_gpus():
    rows = parse_squeue(RECORDED)
    assert (rows["1323"].partition, rows["1323"].gpus) == ("gpu-1card", 1)
    assert (rows["1336"].partition, rows["1336"].gpus) == ("gpu-4card", 4)
