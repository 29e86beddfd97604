"""The portal's gunicorn SIGKILLed during a burst of submissions (issue 16, fault "portal killed
mid-burst with client retries").

Six client threads send 30 tiny jobs (a site image running ``true``, no GPU) to a test portal on
the real dev cluster, each submission with its own ``Idempotency-Key``, through the CLI's own
:func:`portal.cli.client.create` (which sends the POST again with the same key when no answer
comes). Once a few are answered, the portal's gunicorn (master and workers, by pid) is SIGKILLed
with requests in flight, and started again on the same port and database; the reconciler runs on
throughout. Every client keeps asking with its key until it gets an answer. Then each job is
counted by its portal id and by the ``aiportal:UUID`` comment of its Slurm jobs in accounting.
"""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import subprocess
import threading
import time

import pytest
from sqlmodel import Session, select

from portal.models import Job
from slurm.states import JobState
from tests.conftest import JOB_USER
from tests.faults.conftest import Counts, kill_tree, slurm_runs, submit_until_answered
from tests.portal.conftest import _remove_job_folders, start_gunicorn, start_test_portal

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]

SENT = 30
THREADS = 6
#: answers the clients have before the kill (the rest are in flight or not sent yet)
KILL_AFTER = 8
#: how long a client keeps asking with its key, and how long the jobs may take to end
CLIENT_DEADLINE_S = 60
SETTLE_S = 60


@pytest.fixture
def portal(tmp_path):
    # a job stored but never given to Slurm (killed before sbatch) is submitted by the reconciler
    # after submit_grace_s; a request killed mid-flight is taken as dead after idempotency_in_flight_s
    p = start_test_portal(tmp_path, users=(("faults", JOB_USER, False),), reconcile=True,
                          config_lines=("submit_grace_s = 15.0", "idempotency_in_flight_s = 5.0"))
    p.base = tmp_path
    yield p
    p.stop()


def _submit(portal, token_file: str, i: int, image: str, stop: threading.Event) -> tuple[int, dict]:
    """One submission, asked again with its key until the portal answers it (or the test
    stops): (status, body)."""
    body = {"image": image, "node_type": "1card", "gpus": 0, "command": ["true"], "time_limit": "2",
            "name": "kill-%02d" % i}
    return submit_until_answered(portal.url, token_file, body, retries=3, deadline_s=CLIENT_DEADLINE_S, stop=stop)


def test_portal_killed_mid_burst_loses_nothing_and_runs_nothing_twice(portal, base_image, capsys):
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    t0 = time.monotonic()
    token_file = portal.base / "token"
    token_file.write_text(portal.tokens["faults"])
    results: dict[int, tuple[int, dict]] = {}
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        answer = _submit(portal, str(token_file), i, str(base_image), stop) if not stop.is_set() else (0, {})
        with lock:
            results[i] = answer

    job_ids: set[str] = set()
    try:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(client, i) for i in range(SENT)]
            while len(results) < KILL_AFTER and time.monotonic() - t0 < 60:
                time.sleep(0.02)
            answered_at_kill = len(results)
            try:
                kill_tree(portal.procs[0])
                with Session(portal.engine) as db:
                    submitting_at_kill = len(db.exec(select(Job).where(Job.state == JobState.SUBMITTING)).all())
                portal.procs[0] = start_gunicorn(portal.base, portal.env, portal.port)
            except BaseException:
                stop.set()                  # the clients give up at their next failure
                raise
            for f in futures:
                f.result()
        retried = capsys.readouterr().err.count("trying again")

        # every job the portal holds for these submissions has ended, in the portal and in accounting
        deadline = time.monotonic() + SETTLE_S
        while True:
            with Session(portal.engine) as db:
                jobs = [j for j in db.exec(select(Job).where(Job.name.like("kill-%"))) if not j.external]
            job_ids = {j.id for j in jobs}
            runs = slurm_runs(JOB_USER, since)
            ended = all(j.state.terminal for j in jobs) and all(
                runs.get(j.id) and all(r.state.terminal for r in runs[j.id]) for j in jobs)
            if ended or time.monotonic() > deadline:
                break
            time.sleep(1.0)

        counts = Counts(sent=SENT)
        by_name: dict[str, list[Job]] = {}
        for j in jobs:
            by_name.setdefault(j.name, []).append(j)
        accepted = {i: body["id"] for i, (status, body) in results.items() if status == 201}
        counts.accepted = len(accepted)
        problems: list[str] = []
        for i in range(SENT):
            name = "kill-%02d" % i
            mine = by_name.get(name, [])
            counts.duplicated += max(0, len(mine) - 1)              # two portal jobs for one key
            if i not in accepted:
                counts.lost += 1
                problems.append("%s: answered %s" % (name, results.get(i)))
                if any(runs.get(j.id) for j in mine):
                    counts.misreported += 1                          # told it failed, yet it ran
                continue
            job = next((j for j in mine if j.id == accepted[i]), None)
            if job is None:
                counts.misreported += 1                              # told of a job the portal does not hold
                problems.append("%s: answered with job %s, which the portal does not hold" % (name, accepted[i]))
                continue
            mine_runs = runs.get(job.id, [])
            counts.duplicated += max(0, len(mine_runs) - 1)         # two Slurm jobs for one portal job
            started = [r for r in mine_runs if r.started]
            if not started:
                counts.lost += 1
                problems.append("%s (%s): no Slurm job ran it; portal says %s" % (name, job.id, job.state.value))
            else:
                counts.ran += 1
            slurm_run = next((r for r in mine_runs if r.slurm_id == job.slurm_job_id), None)
            if job.slurm_job_id and slurm_run is None:
                counts.misreported += 1                              # its Slurm id is another job's
                problems.append("%s (%s): Slurm id %s does not carry its comment" % (name, job.id, job.slurm_job_id))
            elif slurm_run is not None and job.state.terminal and job.state is not slurm_run.state:
                counts.misreported += 1
                problems.append("%s (%s): portal says %s, Slurm %s" % (name, job.id, job.state.value,
                                                                     slurm_run.state.value))
            elif slurm_run is not None and job.state is JobState.COMPLETED and slurm_run.state is JobState.COMPLETED:
                counts.completed += 1
        print(counts.line())
        # answers that are a job as stored before the kill (its request died): the reconciler submits it
        as_stored = sum(1 for status, body in results.values() if status == 201 and body["state"] == "SUBMITTING")
        print("kill: answered before it=%d, jobs SUBMITTING at it=%d, answered as stored=%d; client retries=%d; %.0f s"
              % (answered_at_kill, submitting_at_kill, as_stored, retried, time.monotonic() - t0))
        assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0), "\n".join(problems)
        assert counts.accepted == counts.ran == counts.completed == SENT, (counts.line(), problems)
        assert answered_at_kill < SENT and retried > 0, "the kill did not land mid-burst"
    finally:
        with Session(portal.engine) as db:
            rows = [j for j in db.exec(select(Job).where(Job.name.like("kill-%")))]
        job_ids |= {j.id for j in rows}
        live = [j.slurm_job_id for j in rows if j.slurm_job_id and not j.state.terminal]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=60, check=False)
        _remove_job_folders(job_ids)
