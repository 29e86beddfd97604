"""The reconciler down for 60 s, and slurmdbd down while jobs end (issue 16, faults 5 and 6).

Times, exit codes and the RUNNING event come from Slurm's accounting whenever the reconciler
missed them; while accounting does not answer, no job is shown ended (nothing is guessed), and
once it answers every row gets its exit code, plain sbatch jobs too."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job
from slurm.states import JobState
from tests.conftest import JOB_USER
from tests.faults.conftest import Counts, kill_tree, slurm_runs
from tests.portal.conftest import _remove_job_folders, start_test_portal

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]

DBD_PIDFILE = Path("/run/slurm/slurmdbd.pid")


@pytest.fixture
def portal(tmp_path):
    p = start_test_portal(tmp_path, users=(("acctfault", JOB_USER, False),), reconcile=True)
    p.base = tmp_path
    yield p
    p.stop()


def _sacct_times(slurm_ids: list[str]) -> dict[str, tuple]:
    res = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(slurm_ids), "-o", "JobIDRaw,Start,End,ExitCode"],
                         capture_output=True, text=True, timeout=60, check=True)
    out = {}
    for line in res.stdout.splitlines():
        jid, start, end, code = line.split("|")
        out[jid] = (dt.datetime.fromisoformat(start).astimezone(dt.timezone.utc),
                    dt.datetime.fromisoformat(end).astimezone(dt.timezone.utc), int(code.split(":")[0]))
    return out


def _submit(portal, n: int, prefix: str, image: str, command: list[str]) -> list[str]:
    import requests
    ids = []
    for i in range(n):
        r = requests.post(portal.url + "/api/v1/jobs", headers={"Authorization": "Bearer " + portal.tokens["acctfault"]},
                          json={"image": image, "node_type": "4card", "gpus": 0, "command": command,
                                "time_limit": "3", "name": "%s-%02d" % (prefix, i)}, timeout=60)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def _jobs(portal, ids) -> list[Job]:
    with Session(portal.engine) as db:
        return [db.get(Job, i) for i in ids]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(1.0)
    raise AssertionError("%s not reached in %.0f s" % (what, timeout))


def _check_true_times(portal, ids: list[str], counts: Counts, problems: list[str]) -> None:
    jobs = _jobs(portal, ids)
    truth = _sacct_times([j.slurm_job_id for j in jobs])
    with Session(portal.engine) as db:
        for job in jobs:
            start, end, code = truth[job.slurm_job_id]
            running = db.exec(select(Event).where(Event.job_id == job.id, Event.kind == EventKind.STATE,
                                                  Event.state == JobState.RUNNING)).all()
            if job.state is JobState.COMPLETED and code == 0:
                counts.completed += 1
            got = (job.state, job.exit_code, job.started_at, job.ended_at, len(running))
            want = (JobState.COMPLETED, code, start, end, 1)
            if got != want:
                counts.misreported += 1
                problems.append("%s: portal %s, accounting %s" % (job.name, got, want))


def test_reconciler_down_60s_then_times_exit_codes_and_running_events_are_slurms(portal, base_image):
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    ids = []
    try:
        kill_tree(portal.procs[1])                         # the reconciler: SIGKILL, by pid
        down = time.monotonic()
        ids = _submit(portal, 12, "recdown", str(base_image), ["sleep", "2"])
        _wait(lambda: all(r and all(x.state.terminal for x in r)
                          for r in (slurm_runs(JOB_USER, since).get(i) for i in ids)), 120, "every job ended in Slurm")
        time.sleep(max(0.0, 60 - (time.monotonic() - down)))
        assert all(j.state is JobState.PENDING for j in _jobs(portal, ids))      # nobody told the portal yet
        with open(portal.base / "reconcile.log", "a") as rlog:
            portal.procs[1] = subprocess.Popen(portal.procs[1].args, env=portal.env, stdout=rlog,
                                               stderr=subprocess.STDOUT)
        caught_up = time.monotonic()
        _wait(lambda: all(j.state.terminal for j in _jobs(portal, ids)), 60, "the portal caught up")
        counts = Counts(sent=len(ids), accepted=len(ids))
        runs = slurm_runs(JOB_USER, since)
        counts.ran = sum(1 for i in ids if any(r.started for r in runs.get(i, [])))
        counts.lost = len(ids) - counts.ran
        counts.duplicated = sum(max(0, len(runs.get(i, [])) - 1) for i in ids)
        problems: list[str] = []
        _check_true_times(portal, ids, counts, problems)
        print(counts.line())
        print("reconciler down %.0f s; caught up in %.1f s" % (caught_up - down, time.monotonic() - caught_up))
        assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0), problems
        assert counts.completed == len(ids)
    finally:
        _remove_job_folders(ids)


def _start_dbd() -> None:
    subprocess.run(["/usr/sbin/slurmdbd"], check=True, timeout=30)
    _wait(lambda: subprocess.run(["sacctmgr", "-n", "show", "cluster"], capture_output=True, timeout=20).returncode == 0,
          60, "slurmdbd answering")


def test_slurmdbd_down_while_jobs_end_nothing_is_shown_ended_until_accounting_says_how(portal, base_image):
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    ids: list[str] = []
    plain = None
    pid = int(DBD_PIDFILE.read_text().split()[0])
    try:
        ids = _submit(portal, 6, "dbddown", str(base_image), ["sleep", "4"])
        ids += _submit(portal, 2, "dbdfail", str(base_image), ["bash", "-c", "sleep 4; exit 3"])
        # and a plain sbatch job of the same user: its exit code must be filled in too
        out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--job-name", "dbdplain",
                              "--partition", "gpu-4card", "--output", "/dev/null", "--chdir", "/tmp", "--time", "3",
                              "--wrap", "sleep 4; exit 5"], capture_output=True, text=True, check=True, timeout=30)
        plain = out.stdout.strip().split(";")[0]
        _wait(lambda: all(j.state is JobState.RUNNING for j in _jobs(portal, ids)), 120, "every job running")
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # the jobs end while accounting is down: squeue says so, the portal waits for accounting
        _wait(lambda: all(not s.strip() or s.strip() in ("COMPLETED", "FAILED", "CD", "F") for s in subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%T", "-j", ",".join(j.slurm_job_id for j in _jobs(portal, ids))],
            capture_output=True, text=True, timeout=20).stdout.splitlines()), 60, "jobs ended in squeue")
        time.sleep(5)                           # a few reconciler cycles with sacct failing
        shown = [j for j in _jobs(portal, ids) if j.state.terminal]
        _start_dbd()
        down_s = time.monotonic() - killed
        _wait(lambda: all(j.state.terminal and j.exit_code is not None for j in _jobs(portal, ids)), 120,
              "every job's end recorded from accounting")
        counts = Counts(sent=len(ids), accepted=len(ids))
        problems = ["%s shown %s while accounting was down" % (j.name, j.state.value) for j in shown]
        counts.misreported += len(shown)
        runs = slurm_runs(JOB_USER, since)
        counts.ran = sum(1 for i in ids if any(r.started for r in runs.get(i, [])))
        counts.lost = len(ids) - counts.ran
        counts.duplicated = sum(max(0, len(runs.get(i, [])) - 1) for i in ids)
        for job in _jobs(portal, ids):
            want = (JobState.FAILED, 3) if job.name.startswith("dbdfail") else (JobState.COMPLETED, 0)
            if (job.state, job.exit_code) != want:
                counts.misreported += 1
                problems.append("%s: %s exit %s, want %s" % (job.name, job.state.value, job.exit_code, want))
            elif job.state is JobState.COMPLETED:
                counts.completed += 1
        ext = _wait(lambda: (lambda rows: rows[0] if rows and rows[0].exit_code is not None else None)(
            [j for j in _external(portal, plain)]), 60, "the plain job's exit code")
        assert (ext.state, ext.exit_code) == (JobState.FAILED, 5)
        print(counts.line())
        print("slurmdbd down %.0f s; %d jobs ended meanwhile" % (down_s, len(ids)))
        assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0), problems
        assert counts.completed == 6
    finally:
        if subprocess.run(["sacctmgr", "-n", "show", "cluster"], capture_output=True, timeout=20).returncode != 0:
            _start_dbd()
        if plain:
            subprocess.run(["scancel", plain], capture_output=True, timeout=30)
        _remove_job_folders(ids)


def _external(portal, slurm_id: str) -> list[Job]:
    with Session(portal.engine) as db:
        return list(db.exec(select(Job).where(Job.slurm_job_id == slurm_id, Job.external == True)))  # noqa: E712
