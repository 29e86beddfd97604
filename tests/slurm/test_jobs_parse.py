"""Job state table and the squeue/sacct parsers."""
import logging

import pytest

from slurm.errors import SlurmParseError
from slurm.jobs import SEP, parse_exit_code, parse_sacct, parse_squeue
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


def L(*cols):
    return SEP.join(cols)


def test_parse_squeue():
    text = "\n".join([L("12", "RUNNING", "None", "g1n1", "alice", "aiportal:u1", "train"),
                      L("13_2", "PENDING", "Dependency", "", "bob", "(null)", "sweep")])
    got = parse_squeue(text)
    assert got["12"].state is JobState.RUNNING and got["12"].nodes == "g1n1" and got["12"].comment == "aiportal:u1"
    assert got["12"].reason == "" and got["12"].name == "train"
    assert got["13_2"].reason == "Dependency" and got["13_2"].comment == ""


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
    with pytest.raises(SlurmParseError, match="expected 7 squeue fields"):
        parse_squeue("12 RUNNING")
    with pytest.raises(SlurmParseError, match="CODE:SIGNAL"):
        parse_exit_code("x:y")


def test_recovery_queue_parse():
    import datetime as dt

    from slurm.jobs import SEP, parse_squeue_recovery
    line = SEP.join(["952", "PD", "BeginTime", "", "1", "1", "alice", "(null)", "2026-11-27T11:52:32", ""])
    line2 = SEP.join(["953", "R", "None", "g1n1", "0", "0", "bob", "aiportal:x", "N/A", ""])
    got = parse_squeue_recovery(line + "\n" + line2 + "\n")
    a, b = got["952"], got["953"]
    assert (a.state, a.reason, a.nodes, a.restarts, a.requeue, a.comment) == (JobState.PENDING, "BeginTime", "", 1, True, "")
    assert a.eligible == dt.datetime(2026, 11, 27, 11, 52, 32).astimezone()
    assert (b.state, b.reason, b.nodes, b.requeue, b.eligible, b.comment) == (JobState.RUNNING, "", "g1n1", False, None,
                                                                             "aiportal:x")
