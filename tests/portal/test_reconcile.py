"""The reconciler: the pure plan as tables, then cycles against the real Slurm cluster
(state changes, a crash between "stored" and "submitted", plain sbatch jobs)."""
import datetime as dt
import time

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job, User
from portal.reconcile import Observed, Reconciler, fold, plan
from portal.services import jobs as jobsvc
from slurm.backend import SlurmCli
from slurm.jobs import JobStatus
from slurm.states import JobState
from tests.conftest import JOB_USER

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
UUID = "0f0e0d0c-0b0a-4909-8807-060504030201"


def S(jid, state, reason="", nodes="", code=None, user="alice", comment="", name=""):
    return JobStatus(jid, JobState(state), reason, nodes, code, 0 if code is not None else None, user, comment, name)


def J(state="PENDING", slurm="10", reason="", nodes="", jid=UUID, updated=NOW, exit_code=None):
    return Job(id=jid, user_id=1, name="t", state=JobState(state), slurm_job_id=slurm, reason=reason, nodes=nodes,
               updated_at=updated, exit_code=exit_code)


@pytest.mark.parametrize("tasks, want", [
    ([], None),
    ([S("1", "RUNNING", nodes="g1n1")], Observed(JobState.RUNNING, "", "g1n1")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "RUNNING", nodes="g1n2")], Observed(JobState.RUNNING, "", "g1n2")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "PENDING", "Resources")], Observed(JobState.PENDING, "Resources", "")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "COMPLETED", code=0)], Observed(JobState.COMPLETED, "", "", 0, 0)),
])
def test_fold(tasks, want):
    assert fold(tasks) == want


def test_fold_failed_array_names_the_first_bad_task():
    got = fold([S("1_0", "COMPLETED", code=0), S("1_2", "FAILED", code=3), S("1_1", "CANCELLED", code=0)])
    assert got.state is JobState.CANCELLED and "2 of 3 tasks" in got.reason and "1_1" in got.reason


@pytest.mark.parametrize("job, queue, acct, want", [
    # nothing changed: no update
    (J("PENDING", reason="Priority"), {"10": S("10", "PENDING", "Priority")}, {}, None),
    # pending -> running on a node
    (J("PENDING"), {"10": S("10", "RUNNING", nodes="g1n1")}, {}, Observed(JobState.RUNNING, "", "g1n1")),
    # finished and still in squeue: the exit code comes from accounting
    (J("RUNNING", nodes="g1n1"), {"10": S("10", "COMPLETED", nodes="g1n1")},
     {"10": S("10", "FAILED", "NonZeroExitCode", "g1n1", 3)}, Observed(JobState.FAILED, "NonZeroExitCode", "g1n1", 3, 0)),
    # gone from squeue: accounting says how it ended
    (J("RUNNING", nodes="g1n1"), {}, {"10": S("10", "COMPLETED", "", "g1n1", 0)}, Observed(JobState.COMPLETED, "", "g1n1", 0, 0)),
])
def test_plan_updates(job, queue, acct, want):
    p = plan([job], queue, acct, {"10"}, {"alice"}, NOW, 120)
    assert p.updates.get(job.id) == want


def test_plan_forgotten_job_is_lost():
    p = plan([J("RUNNING")], {}, {}, {"10"}, {"alice"}, NOW, 120)
    assert p.lost == [UUID]


def test_plan_adopts_a_stored_job_found_by_its_comment():
    job = J("SUBMITTING", slurm=None)
    p = plan([job], {"77": S("77", "PENDING", comment="aiportal:" + UUID)}, {}, set(), {"alice"}, NOW, 120)
    assert p.adopt == {UUID: "77"} and not p.resubmit and not p.external


@pytest.mark.parametrize("age_s, resubmit", [(119, False), (121, True)])
def test_plan_resubmits_a_stored_job_slurm_never_got_after_the_grace_time(age_s, resubmit):
    job = J("SUBMITTING", slurm=None, updated=NOW - dt.timedelta(seconds=age_s))
    p = plan([job], {}, {}, set(), {"alice"}, NOW, 120)
    assert (p.resubmit == [UUID]) is resubmit and not p.adopt


def test_plan_external_jobs_are_those_of_portal_users_without_a_portal_comment():
    queue = {"50": S("50", "RUNNING", user="alice", name="mine"), "51": S("51", "PENDING", user="carol"),
             "52_0": S("52_0", "RUNNING", user="bob"), "52_1": S("52_1", "PENDING", user="bob"),
             "53": S("53", "PENDING", user="aiportal-img", comment="aiportal:image:sha256:x"),
             "54": S("54", "PENDING", user="alice", comment="aiportal:" + UUID), "10": S("10", "PENDING")}
    p = plan([], queue, {}, {"10"}, {"alice", "bob"}, NOW, 120)
    assert [(s.job_id, s.user, s.name) for s in p.external] == [("50", "alice", "mine"), ("52", "bob", "")]


# -- against the real cluster --------------------------------------------------------------------

@pytest.fixture
def real_backend():
    return SlurmCli()


@pytest.fixture
def cleanup_jobs(real_backend):
    ids: list[str] = []
    yield ids
    for jid in ids:
        try:
            real_backend.cancel(jid)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _cycle_until(rec, engine, job_id, pred, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec.cycle()
        with Session(engine) as db:
            job = db.get(Job, job_id)
            if pred(job):
                return job
        time.sleep(0.5)
    raise AssertionError("job %s: condition not reached; last state %s %s" % (job_id, job.state, job.reason))


@pytest.mark.slurm
def test_a_real_job_goes_pending_running_completed_with_a_timeline(cluster_settings, engine, users, real_backend,
                                                                   base_image):
    from storage.credentials import SecretBox
    settings = cluster_settings
    box = SecretBox(settings.data_key)
    with Session(engine, expire_on_commit=False) as db:
        alice = db.get(User, users["alice"].id)
        inp = jobsvc.parse_job_input({"image": str(base_image), "node_type": "1card",
                                      "command": ["python3", "-c", "import time; time.sleep(2); raise SystemExit(3)"]})
        job = jobsvc.submit_job(db, settings, real_backend, box, alice, inp)
    rec = Reconciler(engine, real_backend, settings, box)
    done = _cycle_until(rec, engine, job.id, lambda j: j.state.terminal)
    assert done.state is JobState.FAILED and done.exit_code == 3 and done.started_at and done.ended_at
    with Session(engine) as db:
        kinds = [(e.kind, e.state) for e in db.exec(select(Event).where(Event.job_id == job.id).order_by(Event.id))]
    assert kinds[0] == (EventKind.SUBMITTED, JobState.PENDING)
    assert (EventKind.STATE, JobState.RUNNING) in kinds
    assert kinds[-1] == (EventKind.FINISHED, JobState.FAILED)


@pytest.mark.slurm
def test_crash_between_stored_and_submitted_neither_loses_nor_duplicates(cluster_settings, engine, users, real_backend,
                                                                          base_image, cleanup_jobs):
    """Job A reached Slurm but the portal died before storing its id: adopted by its comment.
    Job B never reached Slurm: submitted again once the grace time is over. Each runs once."""
    settings = cluster_settings
    from dataclasses import replace

    from portal.services.training import submit_training
    from storage.credentials import SecretBox
    box = SecretBox(settings.data_key)
    settings = replace(settings, submit_grace_s=1.0)
    ids = {}
    with Session(engine, expire_on_commit=False) as db:
        alice = db.get(User, users["alice"].id)
        inp = jobsvc.parse_job_input({"image": str(base_image), "node_type": "1card",
                                      "command": ["sleep", "300"], "time_limit": "5"})
        for name in ("a", "b"):
            req = jobsvc.training_request(settings, alice, inp)
            db.add(Job(id=req.job_id, user_id=alice.id, name=name, request_json=__import__("json").dumps(inp.to_json()),
                       job_dir=str(jobsvc.job_dir_for(settings, "alice", req.job_id))))
            db.commit()
            ids[name] = req
        # A: submitted by the "crashed" portal, id never stored
        slurm_a, _, _ = submit_training(settings, real_backend, ids["a"])
        cleanup_jobs.append(slurm_a)
    rec = Reconciler(engine, real_backend, settings, box)
    time.sleep(1.2)
    stats = rec.cycle()
    assert stats.adopted == 1 and stats.resubmitted == 1
    with Session(engine) as db:
        a, b = db.get(Job, ids["a"].job_id), db.get(Job, ids["b"].job_id)
        cleanup_jobs.append(b.slurm_job_id)
        assert a.slurm_job_id == slurm_a and a.state is JobState.PENDING
        assert b.slurm_job_id and b.slurm_job_id != slurm_a and b.state is JobState.PENDING
    again = rec.cycle()
    assert again.adopted == 0 and again.resubmitted == 0
    mine = [s for s in real_backend.queue().values() if s.comment in ("aiportal:" + ids["a"].job_id,
                                                                       "aiportal:" + ids["b"].job_id)]
    assert len(mine) == 2


@pytest.mark.slurm
def test_plain_sbatch_jobs_of_portal_users_show_up_as_external(settings, engine, users, real_backend, cleanup_jobs,
                                                               tmp_path):
    import os
    import subprocess
    os.chmod(tmp_path, 0o777)
    out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--job-name", "by-hand",
                          "--partition", "gpu-1card", "--output", "/dev/null", "--chdir", "/tmp", "--time", "5",
                          "--hold", "--wrap", "sleep 60"], capture_output=True, text=True, check=True, timeout=30)
    jid = out.stdout.strip().split(";")[0]
    cleanup_jobs.append(jid)
    rec = Reconciler(engine, real_backend, settings)
    assert rec.cycle().external >= 1
    with Session(engine) as db:
        job = db.exec(select(Job).where(Job.slurm_job_id == jid)).one()
        assert job.external and job.name == "by-hand" and job.user_id == users["alice"].id
        assert job.state is JobState.PENDING
    assert rec.cycle().external == 0        # found once
    real_backend.cancel(jid)
    job = _cycle_until(rec, engine, job.id, lambda j: j.state.terminal)
    assert job.state is JobState.CANCELLED
