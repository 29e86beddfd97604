"""slurmctld SIGKILLed during a 200-job burst through the API (issue 16, fault 1).

slurmctld keeps its jobs in memory and saves them every few seconds: killed, it comes back with
its last saved state, forgets the jobs it accepted since, and hands their ids to new jobs. The
portal must bind each job to its Slurm job by id *and* the uuid in its comment: a job Slurm
forgot is submitted again once (never shown COMPLETED because another job now has its id), and
submissions made while the controller is down are kept and submitted when it is back.

Eight client threads send 200 tiny jobs (a site image appending its Slurm id to a file in its
output folder: the record of what ran, whatever accounting keeps; no GPU; on the 4-card
and 1-card partitions) each with its own ``Idempotency-Key``; after 60 answers slurmctld is
SIGKILLed (by its pid file) and started again 10 s later. Then every job is counted by its
portal id and by the ``aiportal:UUID`` comments in accounting.
"""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Event, Job
from slurm.states import JobState
from tests.conftest import JOB_USER
from tests.faults.conftest import Counts, slurm_runs, submit_until_answered
from tests.portal.conftest import VENV_BIN, _remove_job_folders, start_test_portal

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]

SENT = 200
THREADS = 8
KILL_AFTER = 60
DOWN_S = 10
PIDFILE = Path("/run/slurm/slurmctld.pid")
SETTLE_S = 300


@pytest.fixture
def portal(tmp_path):
    p = start_test_portal(tmp_path, users=(("ctldfault", JOB_USER, False),), reconcile=True, threads=16,
                          config_lines=("submit_grace_s = 20.0", "submit_retry_s = 3.0", "slurm_timeout_s = 8.0"))
    p.base = tmp_path
    # the health monitor runs beside the reconciler, as `make run` starts them: it releases the
    # jobs Slurm holds after their launch failed on a node it drained ("Duplicate jobid")
    with open(tmp_path / "monitor.log", "w") as mlog:
        p.procs.append(subprocess.Popen([str(VENV_BIN / "aiportal"), "monitor"], env=p.env, stdout=mlog,
                                        stderr=subprocess.STDOUT))
    yield p
    p.stop()


def _ctld_up() -> bool:
    res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15, check=False)
    return "UP" in res.stdout


def _start_ctld() -> None:
    subprocess.run(["/usr/sbin/slurmctld"], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while not _ctld_up():
        if time.monotonic() > deadline:
            raise AssertionError("slurmctld did not come back within 60 s")
        time.sleep(0.5)


@pytest.fixture
def controller():
    """slurmctld is running when the test ends, whatever happened."""
    assert _ctld_up(), "slurmctld is not running"
    yield
    if not _ctld_up():
        _start_ctld()
    # Slurm drains a node where the restarted controller finds a job id it gave out again
    # ("Duplicate jobid"): back in service, as the test found it
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%E"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        node, _, reason = line.partition("|")
        if reason.strip() == "Duplicate jobid":
            print("node %s was drained by Slurm: %s; resumed" % (node, reason.strip()))
            subprocess.run(["scontrol", "update", "nodename=" + node, "state=resume"], capture_output=True, timeout=30)


def _runs_of(job: Job) -> list[str]:
    """The Slurm ids that ran this job's command (each run appended its own)."""
    try:
        return (Path(job.job_dir) / "output" / "runs").read_text().split()
    except OSError:
        return []


def _submit(url: str, token_file: str, i: int, image: str) -> tuple[int, dict]:
    # each run leaves its Slurm id in the job's output folder: what ran, whatever accounting keeps
    body = {"image": image, "node_type": "4card" if i % 4 else "1card", "gpus": 0,
            "command": ["bash", "-c", "echo $SLURM_JOB_ID >> /data/output/runs"],
            "time_limit": "2", "name": "ctld-%03d" % i}
    return submit_until_answered(url, token_file, body, retries=8, deadline_s=120)


def test_slurmctld_killed_mid_burst_loses_nothing_and_reports_nothing_that_did_not_happen(portal, controller,
                                                                                         base_image):
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    t0 = time.monotonic()
    token_file = portal.base / "token"
    token_file.write_text(portal.tokens["ctldfault"])
    results: dict[int, tuple[int, dict]] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        answer = _submit(portal.url, str(token_file), i, str(base_image))
        with lock:
            results[i] = answer

    job_ids: set[str] = set()
    try:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(client, i) for i in range(SENT)]
            while len(results) < KILL_AFTER and time.monotonic() - t0 < 120:
                time.sleep(0.02)
            answered_at_kill = len(results)
            os.kill(int(PIDFILE.read_text().split()[0]), signal.SIGKILL)
            killed_at = time.monotonic()
            time.sleep(DOWN_S)
            _start_ctld()
            print("slurmctld down %.1f s, killed after %d answers" % (time.monotonic() - killed_at, answered_at_kill))
            for f in futures:
                f.result()

        deadline = time.monotonic() + SETTLE_S
        while True:
            with Session(portal.engine) as db:
                jobs = [j for j in db.exec(select(Job).where(Job.name.like("ctld-%"))) if not j.external]
            runs = slurm_runs(JOB_USER, since)
            job_ids = {j.id for j in jobs}
            if all(j.state.terminal or j.state is JobState.UNKNOWN for j in jobs) or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        with Session(portal.engine) as db:
            lost_events = db.exec(select(Event).where(Event.key.like("lost:%"), Event.job_id.in_(job_ids))).all()

        counts = Counts(sent=SENT)
        unrecorded = 0          # runs accounting has no record of any more
        unheard: list[str] = []     # runs whose end the restarted controller did not hear
        failed_by_slurm: list[str] = []
        problems: list[str] = []
        by_name: dict[str, list[Job]] = {}
        for j in jobs:
            by_name.setdefault(j.name, []).append(j)
        # Slurm ids two portal jobs hold: Slurm gave a forgotten job's id to a later job. Both are
        # right as long as each names its own Slurm job (checked below by the comment of that id)
        claimed: dict[str, int] = {}
        for j in jobs:
            if j.slurm_job_id:
                claimed[j.slurm_job_id] = claimed.get(j.slurm_job_id, 0) + 1
        reused = sum(1 for n in claimed.values() if n > 1)
        for i in range(SENT):
            name = "ctld-%03d" % i
            mine = by_name.get(name, [])
            counts.duplicated += max(0, len(mine) - 1)
            status, body = results.get(i, (0, {}))
            if status != 201:
                counts.lost += 1
                problems.append("%s: answered %s %s" % (name, status, body))
                continue
            counts.accepted += 1
            job = next((j for j in mine if j.id == body["id"]), None)
            if job is None:
                counts.misreported += 1
                problems.append("%s: answered with job %s, which the portal does not hold" % (name, body["id"]))
                continue
            ran = _runs_of(job)
            if len(ran) > 1:
                counts.duplicated += 1          # it ran twice
                problems.append("%s (%s): ran as Slurm jobs %s" % (name, job.id, ran))
            current = [r for r in runs.get(job.id, []) if r.slurm_id == job.slurm_job_id]
            if not ran and current and current[-1].state in (JobState.NODE_FAIL, JobState.FAILED) \
                    and job.state is current[-1].state:
                # Slurm itself failed its launch (a node still running the id it gave out again:
                # "Duplicate jobid"); shown as Slurm ended it, not lost without a trace
                failed_by_slurm.append("%s %s" % (name, job.state.value))
                continue
            if not ran:
                counts.lost += 1
                problems.append("%s (%s): never ran; portal says %s" % (name, job.id, job.state.value))
                continue
            counts.ran += 1
            if job.state is JobState.COMPLETED and job.slurm_job_id in ran and job.exit_code == 0:
                counts.completed += 1
            else:
                counts.misreported += 1
                problems.append("%s (%s): portal says %s (Slurm %s, exit %s), ran as %s"
                                % (name, job.id, job.state.value, job.slurm_job_id, job.exit_code, ran))
            # where accounting still has the run, it says the same (a controller restart that hands a
            # forgotten id out again can make slurmdbd replace the first job's record)
            current = [r for r in runs.get(job.id, []) if r.slurm_id == job.slurm_job_id]
            if current and current[-1].state is JobState.CANCELLED and "cancelled there" in job.reason:
                # its end went to the controller before the restart: the restarted one kept it
                # running; the reconciler recorded it from its job folder and cancelled it
                unheard.append(name)
            elif current and current[-1].state is not job.state:
                counts.misreported += 1
                problems.append("%s (%s): portal says %s, accounting %s" % (name, job.id, job.state.value,
                                                                          current[-1].state.value))
            elif not current:
                unrecorded += 1
        print(counts.line())
        print("resubmitted after Slurm lost them: %d; stored while the controller was down: %d; Slurm ids given "
              "out twice: %d; runs accounting no longer has: %d; %.0f s"
              % (len(lost_events), sum(1 for s, b in results.values() if s == 201 and b.get("state") == "SUBMITTING"),
                 reused, unrecorded, time.monotonic() - t0))
        assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0), "\n".join(problems[:40])
        print("runs whose end the restarted controller did not hear (recorded from the job folder, cancelled in "
              "Slurm): %d %s" % (len(unheard), unheard))
        print("launches Slurm itself failed after the restart (shown as it ended them): %d %s"
              % (len(failed_by_slurm), failed_by_slurm))
        assert counts.accepted == SENT and counts.ran == counts.completed == SENT - len(failed_by_slurm), (
            counts.line(), problems[:40])
        assert len(failed_by_slurm) <= 10, failed_by_slurm
    finally:
        with Session(portal.engine) as db:
            rows = list(db.exec(select(Job).where(Job.name.like("ctld-%"))))
        job_ids |= {j.id for j in rows}
        live = [j.slurm_job_id for j in rows if j.slurm_job_id and not j.state.terminal]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=60, check=False)
        _remove_job_folders(job_ids)
