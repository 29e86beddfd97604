"""Helpers of the fault tests (issue 16): each test injects a fault into the running dev cluster
or a test portal while real jobs are in flight, restores everything, and counts every job by its
portal id and by the ``aiportal:UUID`` in its Slurm comment. Each prints one line of
:class:`Counts`; the target is 0 lost, 0 duplicated, 0 misreported."""
from __future__ import annotations

import argparse
import datetime as dt
import threading
import uuid
import os
import signal
import subprocess
import time
from dataclasses import dataclass, fields
from pathlib import Path

from slurm.states import JobState, parse_job_state

COMMENT_PREFIX = "aiportal:"


@dataclass
class Counts:
    """What happened to the submissions of one fault test.

    sent: submissions the clients made; accepted: those the portal answered 201 (a job id);
    ran: accepted jobs Slurm started; completed: accepted jobs the portal shows COMPLETED and
    Slurm's accounting agrees; lost: submissions never answered, and accepted jobs that never
    ran; duplicated: extra Slurm jobs (or portal jobs) for one submission; misreported: a
    portal state, Slurm id or answer that says something that did not happen."""

    sent: int = 0
    accepted: int = 0
    ran: int = 0
    completed: int = 0
    lost: int = 0
    duplicated: int = 0
    misreported: int = 0

    def line(self) -> str:
        return "counts: " + " ".join("%s=%d" % (f.name, getattr(self, f.name)) for f in fields(self))


def descendants(pid: int) -> list[int]:
    """The pids of ``pid``'s children, grandchildren, ... (from /proc, at this moment)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process a test started and every process under it, by pid (the parent first,
    so it cannot start new ones); reaps the parent. The pids killed."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(Path("/proc/%d" % p).exists() and _alive(p) for p in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class SlurmRun:
    """One Slurm job as accounting has it."""

    slurm_id: str
    portal_id: str
    state: JobState
    started: bool


def slurm_runs(user: str, since: dt.datetime) -> dict[str, list[SlurmRun]]:
    """Every Slurm job of ``user`` submitted since ``since`` that carries ``aiportal:UUID`` in
    its comment, by that uuid (sacct: the cluster keeps comments, AccountingStoreFlags=job_comment)."""
    # --duplicates: a controller restart that forgot jobs hands their ids out again, and sacct
    # would otherwise show only the newest job of each id
    argv = ["sacct", "-X", "-n", "-P", "--duplicates", "-u", user, "-S", since.astimezone().strftime("%Y-%m-%dT%H:%M:%S"),
            "-o", "JobIDRaw,Comment,State,Start"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise AssertionError("%s exited %d: %s" % (argv, res.returncode, res.stderr))
    out: dict[str, list[SlurmRun]] = {}
    for line in res.stdout.splitlines():
        parts = line.split("|")
        if len(parts) != 4 or not parts[1].startswith(COMMENT_PREFIX):
            continue
        jid, comment, state, start = parts
        pid = comment[len(COMMENT_PREFIX):]
        out.setdefault(pid, []).append(SlurmRun(jid, pid, parse_job_state(state),
                                                start not in ("", "None", "Unknown")))
    return out


def submit_until_answered(url: str, token_file: str, body: dict, *, retries: int, deadline_s: float,
                          stop: threading.Event | None = None) -> tuple[int, dict]:
    """One job submission through the CLI's own :func:`portal.cli.client.create` with its own
    ``Idempotency-Key``, asked again with that key until the portal answers it (or the deadline
    passes, or ``stop`` is set): (status, body); status 0 when no answer came."""
    from portal.cli.client import ApiError, CliError, create
    args = argparse.Namespace(url=url, token_file=token_file, timeout=20.0, idempotency_key=str(uuid.uuid4()),
                              retries=retries)
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return 201, create(args, "/jobs", body, "job")
        except ApiError as e:
            return e.status, {"error": e.code, "message": e.detail}
        except CliError as e:            # gave up for now: ask again, with the same key
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                return 0, {"error": "no_answer", "message": str(e)}
