"""The reconciler: the pure plan as tables, then cycles against the real Slurm cluster
(state changes, a crash between "stored" and "submitted", plain sbatch jobs)."""
import datetime as dt
import re
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job, User
from dataclasses import replace

from portal.daemons.reconcile import Doomed, Observed, Reconciler, external_candidates, fold, plan
from portal.models.jobs import JobCreate
from portal.services import jobs as jobsvc
from slurm.backend import SlurmCli
from slurm.jobs import SEP, JobStatus
from slurm.states import JobState
from tests.conftest import JOB_USER

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.timezone.utc)
UUID = "0f0e0d0c-0b0a-4909-8807-060504030201"


def S(jid, state, reason="", nodes="", code=None, user="alice", comment="aiportal:" + UUID, name="", restarts=None):
    return JobStatus(jid, JobState(state), reason, nodes, code, 0 if code is not None else None, user, comment, name,
                     restarts)


def J(state="PENDING", slurm="10", reason="", nodes="", jid=UUID, updated=NOW, exit_code=None, restarts=0):
    return Job(id=jid, user_id=1, name="t", state=JobState(state), slurm_job_id=slurm, reason=reason, nodes=nodes,
               updated_at=updated, exit_code=exit_code, restarts=restarts)


@pytest.mark.parametrize("tasks, want", [
    ([], None),
    ([S("1", "RUNNING", nodes="g1n1")], Observed(JobState.RUNNING, "", "g1n1")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "RUNNING", nodes="g1n2")], Observed(JobState.RUNNING, "", "g1n2")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "PENDING", "Resources")], Observed(JobState.PENDING, "Resources", "")),
    ([S("1_0", "COMPLETED", code=0), S("1_1", "COMPLETED", code=0)], Observed(JobState.COMPLETED, "", "", 0, 0)),
])
def test_fold(tasks, want):
    assert fold(tasks) == want


@pytest.mark.parametrize("tasks, restarts", [
    ([S("1", "RUNNING", restarts=2)], 2),
    ([S("1", "RUNNING")], None),                                             # the source did not say
    ([S("1_0", "RUNNING", restarts=1), S("1_1", "PENDING", restarts=2)], 3),  # an array: its tasks' together
    ([S("1_0", "COMPLETED", code=0, restarts=1), S("1_1", "COMPLETED", code=0, restarts=0)], 1),
    ([S("1_0", "RUNNING", restarts=1), S("1_1", "COMPLETED", code=0)], None),
])
def test_fold_restart_count(tasks, restarts):
    assert fold(tasks).restarts == restarts


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


@pytest.mark.parametrize("job, queue, acct, restarts", [
    # only Slurm's count rose (requeued, running again on the same node before a cycle saw it)
    (J("RUNNING", nodes="g1n1"), {"10": S("10", "RUNNING", nodes="g1n1", restarts=1)}, {}, 1),
    # finished and still in squeue: accounting's exit code, squeue's count
    (J("RUNNING", nodes="g1n1"), {"10": S("10", "COMPLETED", nodes="g1n1", restarts=2)},
     {"10": S("10", "COMPLETED", "", "g1n1", 0)}, 2),
])
def test_plan_takes_the_restart_count_from_slurm(job, queue, acct, restarts):
    p = plan([job], queue, acct, {"10"}, {"alice"}, NOW, 120)
    assert p.updates[job.id].restarts == restarts


@pytest.mark.parametrize("stored, counted", [(1, 1), (2, 1), (1, None)])
def test_plan_no_update_when_slurm_counts_no_more_restarts(stored, counted):
    p = plan([J("RUNNING", nodes="g1n1", restarts=stored)], {"10": S("10", "RUNNING", nodes="g1n1", restarts=counted)},
             {}, {"10"}, {"alice"}, NOW, 120)
    assert not p.updates


def D(jid, state, reason="", dependency="", nodes="", code=None, user="alice", comment="aiportal:" + UUID):
    return JobStatus(jid, JobState(state), reason, nodes, code, 0 if code is not None else None, user, comment,
                     dependency=dependency)


@pytest.mark.parametrize("job, queue, acct, want", [
    # Slurm's reason, and the dependency squeue marks failed (as the dev cluster shows them)
    (J("PENDING", reason="Dependency"), {"10": D("10", "PENDING", "DependencyNeverSatisfied", "afterok:7(failed)")},
     {}, Doomed(("7",), live=True)),
    # the dependency is marked failed before the scheduler changed the reason
    (J("PENDING", reason="Dependency"), {"10": D("10", "PENDING", "Dependency", "afterok:7(failed)")},
     {}, Doomed(("7",), live=True)),
    # the reason alone (no dependency shown)
    (J("PENDING", reason="Priority"), {"10": D("10", "PENDING", "DependencyNeverSatisfied")}, {}, Doomed((), True)),
    # cancelled already (by Slurm or another reconciler): squeue's record says why, sacct's does not
    (J("PENDING", reason="Dependency"), {"10": D("10", "CANCELLED", "DependencyNeverSatisfied", "afterok:7(failed)")},
     {"10": D("10", "CANCELLED", "Dependency")}, Doomed(("7",), live=False)),
    (J("PENDING", reason="Dependency"), {}, {"10": D("10", "CANCELLED", "DependencyNeverSatisfied")},
     Doomed((), live=False)),
    # still waiting, or any one would do and one is still to come: not doomed
    (J("PENDING", reason="Dependency"), {"10": D("10", "PENDING", "Dependency", "afterok:7(unfulfilled)")}, {}, None),
    (J("PENDING", reason="Dependency"),
     {"10": D("10", "PENDING", "Dependency", "afterok:7(failed)?afterok:8(unfulfilled)")}, {}, None),
    # ran (its dependency was met), or ended otherwise
    (J("PENDING"), {"10": D("10", "RUNNING", "None", "afterok:7(fulfilled)", nodes="g1n1")}, {}, None),
    (J("RUNNING", nodes="g1n1"), {}, {"10": D("10", "CANCELLED", "None", code=0)}, None),
])
def test_plan_finds_jobs_that_can_never_start(job, queue, acct, want):
    p = plan([job], queue, acct, {"10"}, {"alice"}, NOW, 120)
    assert p.doomed.get(job.id) == want
    if want is not None:
        assert job.id not in p.updates


def test_plan_a_job_with_no_record_anywhere_is_unseen_and_one_whose_id_another_job_holds_is_forgotten():
    p = plan([J("RUNNING")], {}, {}, {"10"}, {"alice"}, NOW, 120)
    assert (p.unseen, p.forgotten, p.updates) == ([UUID], [], {})
    other = S("10", "COMPLETED", nodes="g1n1", code=0, comment="aiportal:" + "1" * 8 + UUID[8:])
    for queue, acct in (({"10": replace(other, state=JobState.RUNNING)}, {}), ({}, [other])):
        p = plan([J("RUNNING")], queue, acct, {"10"}, {"alice"}, NOW, 120)
        assert (p.forgotten, p.unseen, p.updates) == ([UUID], [], {})       # never "COMPLETED" with exit 0


def test_plan_accounting_decides_how_a_job_ended_by_its_own_record():
    # the accounting history of id 10: this job's run, then a later job's after a controller restart
    mine = S("10", "FAILED", "NonZeroExitCode", "g1n1", 3)
    later = S("10", "COMPLETED", nodes="g1n2", code=0, comment="aiportal:" + "1" * 8 + UUID[8:])
    p = plan([J("RUNNING", nodes="g1n1")], {}, [mine, later], {"10"}, {"alice"}, NOW, 120)
    assert p.updates[UUID].state is JobState.FAILED and p.updates[UUID].exit_code == 3
    # finished in squeue, accounting has no record yet (or did not answer): no change until it does
    for acct, ok in (({}, True), ({"10": mine}, False)):
        p = plan([J("RUNNING", nodes="g1n1")], {"10": S("10", "COMPLETED", nodes="g1n1")}, acct, {"10"}, {"alice"},
                 NOW, 120, accounting_ok=ok)
        assert (p.updates, p.unseen, p.forgotten) == ({}, [], [])
    # accounting's record of a job the controller lost (still PENDING there) is no end
    p = plan([J("PENDING")], {}, [S("10", "PENDING", "Priority")], {"10"}, {"alice"}, NOW, 120)
    assert (p.updates, p.unseen) == ({}, [UUID])


def test_forgotten_by_restart_only_jobs_accepted_before_the_controller_started():
    from portal.daemons.reconcile import forgotten_by_restart
    old = J("RUNNING", jid="a")
    old.submitted_at = NOW - dt.timedelta(minutes=5)
    new = J("PENDING", jid="b")
    new.submitted_at = NOW + dt.timedelta(seconds=5)
    assert forgotten_by_restart([old, new], NOW) == ["a"]
    assert forgotten_by_restart([old, new], None) == []         # never lost on a guess


@pytest.mark.parametrize("age_s, retry", [(9, False), (11, True)])
def test_plan_a_job_stored_while_the_controller_was_down_is_tried_again_soon(age_s, retry):
    from portal.services.jobs import CONTROLLER_DOWN
    job = J("SUBMITTING", slurm=None, reason=CONTROLLER_DOWN + ": connect failure",
            updated=NOW - dt.timedelta(seconds=age_s))
    assert (plan([job], {}, {}, set(), {"alice"}, NOW, 120, submit_retry_s=10).resubmit == [UUID]) is retry


def test_plan_adopts_a_stored_job_found_by_its_comment():
    job = J("SUBMITTING", slurm=None)
    p = plan([job], {"77": S("77", "PENDING", comment="aiportal:" + UUID)}, {}, set(), {"alice"}, NOW, 120)
    assert p.adopt == {UUID: "77"} and not p.resubmit


@pytest.mark.parametrize("age_s, resubmit", [(119, False), (121, True)])
def test_plan_resubmits_a_stored_job_slurm_never_got_after_the_grace_time(age_s, resubmit):
    job = J("SUBMITTING", slurm=None, updated=NOW - dt.timedelta(seconds=age_s))
    p = plan([job], {}, {}, set(), {"alice"}, NOW, 120)
    assert (p.resubmit == [UUID]) is resubmit and not p.adopt


def test_plan_external_jobs_are_those_of_portal_users_without_a_comment_the_portal_wrote_for_them():
    """A comment counts as the portal's only where it names a job, replica or build the portal
    stored for that account (``own``), or is one it cannot match (a stage-out, a conversion):
    ``--comment=aiportal:x``, a printed script's uuid with no row, or another user's job id hide nothing."""
    other = "11111111-2222-4333-8444-555555555555"
    queue = {"50": S("50", "RUNNING", user="alice", name="mine", comment=""), "51": S("51", "PENDING", user="carol", comment=""),
             "52_0": S("52_0", "RUNNING", user="bob", comment=""), "52_1": S("52_1", "PENDING", user="bob", comment=""),
             "53": S("53", "PENDING", user="aiportal-img", comment="aiportal:image:sha256:x"),
             "54": S("54", "PENDING", user="alice", comment="aiportal:" + UUID), "10": S("10", "PENDING"),
             "55": S("55", "PENDING", user="alice", name="hidden?", comment="aiportal:x"),
             "56": S("56", "PENDING", user="bob", name="printed", comment="aiportal:" + other),
             "57": S("57", "PENDING", user="alice", comment="aiportal:stage-out"),
             "58": S("58", "PENDING", user="bob", name="claims", comment="aiportal:service:r1"),
             "59": S("59", "PENDING", user="alice", name="img", comment="aiportal:image:x"),
             "60": S("60", "PENDING", user="alice", name="so", comment="aiportal:stage-outX"),
             # a deleted service's replica, finished: Slurm shows it a while, it is not adopted
             "61": S("61", "CANCELLED", user="bob", comment="aiportal:service:gone")}
    from portal.daemons.reconcile import Records, claimed_comments, external_candidates, externals
    assert claimed_comments(queue) == {"job": {(UUID, "alice"), (other, "bob")},
                                       "service": {("r1", "bob"), ("gone", "bob")}, "build": set()}
    own = {("aiportal:" + UUID, "alice")}     # alice's job: the portal wrote it; r1 is not bob's replica
    found, arrays = externals(external_candidates(queue, {"10"}, {"alice", "bob"}, own), Records({}), True)
    assert [(s.job_id, s.user, s.name) for s in found] == [
        ("50", "alice", "mine"), ("52", "bob", ""), ("55", "alice", "hidden?"), ("56", "bob", "printed"),
        ("58", "bob", "claims"), ("59", "alice", "img"), ("60", "alice", "so")]
    assert arrays == {"52"}
    # what squeue said of its partition and GPUs is kept
    queue["50"] = replace(queue["50"], partition="gpu-4card", gpus=4)
    found, _ = externals(external_candidates(queue, {"10"}, {"alice", "bob"}, own), Records({}), True)
    assert (found[0].partition, found[0].gpus) == ("gpu-4card", 4)


# -- cycles on recorded Slurm output --------------------------------------------------------------

def uid(slurm_id: str) -> str:
    """The portal id the tests below give the job they store as Slurm job ``slurm_id``."""
    return "00000000-0000-4000-8000-%012d" % int(slurm_id.split("_")[0])


def Q(jid, state, restarts, nodes="", reason="None", user="alice", comment=None, name="train",
      stdout="/tmp/slurm-%j.out", dependency="(null)", submitted="2026-11-27T11:00:00", started="N/A",
      partition="gpu-1card", tres="cpu=8,mem=32000M,node=1,billing=8,gres/gpu=1,gres/gpu:p40=1"):
    """One line of ``squeue --noheader --array --states=all --Format <squeue_format()>`` (the
    comment of the portal job the tests store for it, unless given)."""
    comment = "aiportal:" + uid(jid) if comment is None else comment
    return "".join(c + SEP for c in (jid, state, reason, nodes, str(restarts), "1", user, comment, "N/A", name,
                                     stdout, dependency, submitted, started, partition, tres))


class Recorded(SlurmCli):
    """SlurmCli answering from recorded output, one answer per command (``squeue`` or ``sacct``):
    the real argv, parsers, plan and database writes, without the cluster."""

    def __init__(self, answers):
        super().__init__()
        self.answers = {cmd: list(texts) for cmd, texts in answers.items()}
        self.argvs: list[list[str]] = []

    def _call(self, argv, stdin=None, error=None):
        self.argvs.append(argv)
        answer = self.answers[argv[0]].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _cycles(engine, settings, job_state, answers, events=()):
    """Store a running job (Slurm 4242 on g1n1), plus ``events`` (kind, key); run one cycle per
    recorded squeue answer; return the job, its requeue events and the Slurm calls per cycle."""
    with Session(engine, expire_on_commit=False) as db:
        job = Job(id=uid("4242"), user_id=db.exec(select(User).where(User.name == "alice")).one().id, name="t",
                  state=job_state, slurm_job_id="4242", nodes="g1n1")
        db.add(job)
        db.flush()
        for kind, key in events:
            db.add(Event(kind=kind, key=key, job_id=job.id, user_id=job.user_id, message="by the monitor"))
        db.commit()
    backend = Recorded(answers)
    rec = Reconciler(engine, backend, settings)
    calls = []
    for _ in answers["squeue"][:]:
        before = len(backend.argvs)
        rec.cycle()
        calls.append(len(backend.argvs) - before)
    with Session(engine) as db:
        job = db.get(Job, job.id)
        requeues = [e.message for e in db.exec(select(Event).where(Event.job_id == job.id,
                                                                    Event.kind == EventKind.REQUEUED))]
    return job, requeues, calls


def test_own_comments_are_the_rows_of_the_same_account(settings, engine, users):
    """A job's uuid counts as the portal's only for the Unix account its row belongs to; a
    service replica's and a build's likewise (through their service's and build's owner)."""
    from portal.models import ImageBuild, Service, ServiceReplica
    with Session(engine) as db:
        alice = db.exec(select(User).where(User.name == "alice")).one()
        db.add(Job(id=uid("7001"), user_id=alice.id, name="t", state=JobState.PENDING))
        svc = Service(user_id=alice.id, name="svc", spec_json="{}", service_dir="/x")
        db.add(svc)
        db.flush()
        db.add(ServiceReplica(id="r-alice", service_id=svc.id))
        build = ImageBuild(user_id=alice.id, tag="localhost:5000/alice/x:1")
        db.add(build)
        db.commit()
        build_id = build.id
    queue = {"1": S("1", "PENDING", user="alice", comment="aiportal:" + uid("7001")),
             "2": S("2", "PENDING", user="bob", comment="aiportal:" + uid("7001")),
             "3": S("3", "PENDING", user="alice", comment="aiportal:service:r-alice"),
             "4": S("4", "PENDING", user="bob", comment="aiportal:service:r-alice"),
             "5": S("5", "PENDING", user="alice", comment="aiportal:build:%d" % build_id),
             "6": S("6", "PENDING", user="alice", comment="aiportal:build:999999"),
             # what a user may write there: never a crash of the cycle
             "8": S("8", "PENDING", user="alice", comment="aiportal:build:\u00b2"),
             "9": S("9", "PENDING", user="alice", comment="aiportal:build:" + "9" * 30),
             "7": S("7", "PENDING", user="alice", comment="aiportal:" + uid("7002"))}
    with Session(engine) as db:
        own = Reconciler(engine, Recorded({}), settings)._own_comments(db, queue)
    assert own == {("aiportal:" + uid("7001"), "alice"), ("aiportal:service:r-alice", "alice"),
                   ("aiportal:build:%d" % build_id, "alice")}
    assert sorted(external_candidates(queue, set(), {"alice", "bob"}, own)) == ["2", "4", "6", "7", "8", "9"]


@pytest.mark.parametrize("answers", [
    # requeued and running again before the next cycle: never seen pending
    [Q("4242", "R", 0, "g1n1"), Q("4242", "R", 1, "g1n2"), Q("4242", "R", 1, "g1n2")],
    [Q("4242", "R", 0, "g1n1"), Q("4242", "R", 1, "g1n1"), Q("4242", "R", 1, "g1n1")],
    # seen completing, pending and running again: the count rose once
    [Q("4242", "R", 0, "g1n1"), Q("4242", "CG", 1, "g1n1"), Q("4242", "PD", 1, reason="BeginTime"),
     Q("4242", "R", 1, "g1n2")],
    # seen pending: the transition and the rise are one requeue
    [Q("4242", "R", 0, "g1n1"), Q("4242", "PD", 1, reason="BeginTime"), Q("4242", "PD", 1, reason="Priority"),
     Q("4242", "R", 1, "g1n2")],
])
def test_one_requeue_event_per_rise_of_slurms_restart_count(engine, users, settings, answers):
    job, requeues, calls = _cycles(engine, settings, JobState.RUNNING, {"squeue": answers})
    assert job.restarts == 1 and len(requeues) == 1 and requeues[0].startswith("requeued (restart 1)"), requeues
    assert calls == [1] * len(answers)          # one squeue per cycle, nothing else


def test_every_rise_is_one_requeue_event(engine, users, settings):
    answers = [Q("4242", "R", 0, "g1n1"), Q("4242", "R", 1, "g1n2"), Q("4242", "PD", 2, reason="BeginTime"),
               Q("4242", "R", 2, "g1n1"), Q("4242", "R", 4, "g1n3")]
    job, requeues, _ = _cycles(engine, settings, JobState.RUNNING, {"squeue": answers})
    assert job.restarts == 4
    assert requeues == ["requeued (restart 1); running on g1n2", ("requeued (restart 2); pending: waiting for its start time (a job requeued after a "
                         "node failure waits about two minutes here) [BeginTime]"),
                        "requeued (restarts 3-4); running on g1n3"]


def test_requeued_and_finished_between_cycles(engine, users, settings):
    finished = SEP.join(["4242", "COMPLETED", "0:0", "g1n2", "alice", "aiportal:" + uid("4242"), "None", "train", "2026-11-27T11:00:00", "2026-11-27T11:00:05", "2026-11-27T11:02:00"])
    job, requeues, calls = _cycles(engine, settings, JobState.RUNNING, {
        "squeue": [Q("4242", "R", 0, "g1n1"), Q("4242", "CD", 1, "g1n2")], "sacct": [finished]})
    assert job.state is JobState.COMPLETED and job.exit_code == 0 and job.restarts == 1 and len(requeues) == 1
    assert calls == [1, 2]                      # squeue, then sacct for the job that finished


def test_array_tasks_restarts_add_up(engine, users, settings):
    answers = [Q("4242_0", "R", 0, "g1n1") + "\n" + Q("4242_1", "R", 0, "g1n2"),
               Q("4242_0", "R", 1, "g1n3") + "\n" + Q("4242_1", "R", 0, "g1n2"),
               Q("4242_0", "R", 1, "g1n3") + "\n" + Q("4242_1", "PD", 1, reason="BeginTime"),
               Q("4242_0", "R", 1, "g1n3") + "\n" + Q("4242_1", "R", 1, "g1n1")]
    job, requeues, calls = _cycles(engine, settings, JobState.RUNNING, {"squeue": answers})
    assert job.restarts == 2 and len(requeues) == 2 and calls == [1] * 4


def test_a_requeue_the_monitor_recorded_is_not_recorded_again(engine, users, settings):
    """The monitor keyed its event ``requeue:ID:RUN``; the job row the cycle read may predate it."""
    answers = [Q("4242", "PD", 1, reason="BeginTime"), Q("4242", "R", 1, "g1n2")]
    job, requeues, _ = _cycles(engine, settings, JobState.RUNNING, {"squeue": answers},
                               events=[(EventKind.REQUEUED, "requeue:4242:0")])
    assert job.restarts == 1 and requeues == ["by the monitor"]


def test_without_a_count_from_slurm_a_requeue_is_inferred_from_the_transition(engine, users, settings, fake_backend):
    with Session(engine, expire_on_commit=False) as db:
        job = Job(id=UUID, user_id=users["alice"].id, name="t", state=JobState.RUNNING, slurm_job_id="4242",
                  nodes="g1n1")
        db.add(job)
        db.commit()
    rec = Reconciler(engine, fake_backend, settings)
    for status in (S("4242", "PENDING", "BeginTime"), S("4242", "RUNNING", nodes="g1n2")):
        fake_backend.jobs["4242"] = status
        rec.cycle()
    with Session(engine) as db:
        kinds = [e.kind for e in db.exec(select(Event).where(Event.job_id == job.id).order_by(Event.id))]
        assert db.get(Job, job.id).restarts == 1
    assert kinds == [EventKind.REQUEUED, EventKind.STATE]


def _waiting(engine, users, slurm_ids, external=False):
    """Store portal jobs pending on Slurm jobs ``slurm_ids`` (waiting on a dependency)."""
    with Session(engine, expire_on_commit=False) as db:
        jobs = [Job(id=uid(sid), user_id=users["alice"].id, name="t", state=JobState.PENDING, slurm_job_id=sid,
                    reason="Dependency", external=external) for sid in slurm_ids]
        db.add_all(jobs)
        db.commit()
    return [j.id for j in jobs]


def _conversion_settings(settings, tmp_path, log=None):
    from dataclasses import replace
    (tmp_path / "cache" / "logs").mkdir(parents=True)
    if log is not None:
        (tmp_path / "cache" / "logs" / "convert-700.out").write_text(log)
    return replace(settings, image_cache=str(tmp_path / "cache"))


CONVERSION_COMMENT = "aiportal:image:sha256:" + "ab" * 32
FAILED_CONVERSION_SACCT = SEP.join(["700", "FAILED", "2:0", "g1n1", "aiportal-img", CONVERSION_COMMENT,
                                    "NonZeroExitCode", "convert-abababababab", "2026-11-27T11:00:00", "2026-11-27T11:00:05", "2026-11-27T11:02:00"])


def test_a_failed_conversion_fails_every_job_waiting_on_it_at_once_with_its_error(engine, users, settings, tmp_path):
    from portal.models.jobs import JobPublic
    from tests.portal.test_conversions import BAD_ARCHIVE
    settings = _conversion_settings(settings, tmp_path, BAD_ARCHIVE)
    ids = _waiting(engine, users, ["4242", "4243"])
    squeue = "\n".join([Q("4242", "PD", 0, reason="DependencyNeverSatisfied", dependency="afterok:700(failed)"),
                        Q("4243", "PD", 0, reason="DependencyNeverSatisfied", dependency="afterok:700(failed)"),
                        Q("700", "F", 0, "g1n1", reason="NonZeroExitCode", user="aiportal-img",
                          comment=CONVERSION_COMMENT)])
    backend = Recorded({"squeue": [squeue], "sacct": [FAILED_CONVERSION_SACCT], "scancel": ["", ""]})
    stats = Reconciler(engine, backend, settings).cycle()
    assert [a[0] for a in backend.argvs] == ["squeue", "sacct", "scancel", "scancel"]
    assert backend.argvs[1][-1] == "700" and {a[-1] for a in backend.argvs[2:]} == {"4242", "4243"}
    assert stats.updated == 2 and stats.slurm_calls == 4
    reason = ("a job it depends on (700, its image conversion) ended without success: While performing build: "
              "conveyor failed to get: error reading the docker archive file: unexpected EOF")
    with Session(engine) as db:
        for job_id in ids:
            job = db.get(Job, job_id)
            assert (job.state, job.reason) == (JobState.FAILED, reason) and job.ended_at
            public = JobPublic.of(job)
            assert public.reason_text == reason + " [DependencyNeverSatisfied]"
            assert public.reason_category == "dependency"
            last = db.exec(select(Event).where(Event.job_id == job_id).order_by(Event.id.desc())).first()
            assert (last.kind, last.state, last.message) == (EventKind.FINISHED, JobState.FAILED, "FAILED: " + reason)


def test_a_plain_job_whose_dependency_failed_ends_failed_with_how_that_job_ended(engine, users, settings, tmp_path):
    settings = _conversion_settings(settings, tmp_path)
    [job_id] = _waiting(engine, users, ["4242"], external=True)
    squeue = Q("4242", "PD", 0, reason="DependencyNeverSatisfied", dependency="afterok:650(failed)")
    failed = SEP.join(["650", "FAILED", "1:0", "g1n1", "alice", "", "NonZeroExitCode", "first", "2026-11-27T11:00:00", "2026-11-27T11:00:05", "2026-11-27T11:02:00"])
    backend = Recorded({"squeue": [squeue], "sacct": [failed], "scancel": [""]})
    Reconciler(engine, backend, settings).cycle()
    with Session(engine) as db:
        job = db.get(Job, job_id)
        assert (job.state, job.reason) == (JobState.FAILED,
                                           "a job it depends on (650) ended without success: FAILED with exit code 1")


def test_a_job_scancel_refuses_is_tried_again_next_cycle(engine, users, settings, tmp_path):
    from slurm.errors import SlurmCommandError
    settings = _conversion_settings(settings, tmp_path)
    [job_id] = _waiting(engine, users, ["4242"])
    squeue = Q("4242", "PD", 0, reason="DependencyNeverSatisfied", dependency="afterok:650(failed)")
    failed = SEP.join(["650", "FAILED", "1:0", "g1n1", "alice", "", "NonZeroExitCode", "first", "2026-11-27T11:00:00", "2026-11-27T11:00:05", "2026-11-27T11:02:00"])
    refused = SlurmCommandError(["scancel", "4242"], 1, "", "scancel: error: Unable to contact slurm controller")
    backend = Recorded({"squeue": [squeue, squeue], "sacct": [failed, failed], "scancel": [refused, ""]})
    rec = Reconciler(engine, backend, settings)
    rec.cycle()
    with Session(engine) as db:
        assert db.get(Job, job_id).state is JobState.PENDING
    rec.cycle()
    with Session(engine) as db:
        assert db.get(Job, job_id).state is JobState.FAILED


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
        create = JobCreate(image=str(base_image), node_type="1card",
                           command=["python3", "-c", "import time; time.sleep(2); raise SystemExit(3)"])
        job = jobsvc.submit_job(db, settings, real_backend, box, alice, create)
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

    from portal.services.submit import Submission, check, job_dir_for, submit
    from storage.credentials import SecretBox
    box = SecretBox(settings.data_key)
    settings = replace(settings, submit_grace_s=1.0)
    ids = {}
    with Session(engine, expire_on_commit=False) as db:
        alice = db.get(User, users["alice"].id)
        create = JobCreate(image=str(base_image), node_type="1card", command=["sleep", "300"], time_limit="5")
        for name in ("a", "b"):
            req = Submission(user=alice.unix_user)
            db.add(Job(id=req.job_id, user_id=alice.id, name=name, request_json=create.model_dump_json(),
                       job_dir=str(job_dir_for(settings, "alice", req.job_id))))
            db.commit()
            ids[name] = req
        # A: submitted by the "crashed" portal, id never stored
        slurm_a = submit(settings, real_backend, check(settings, create, ids["a"])).slurm_id
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
                          "--partition", "gpu-4card", "--gres=gpu:4", "--output", "/dev/null", "--chdir", "/tmp",
                          "--time", "5", "--hold", "--wrap", "sleep 60"], capture_output=True, text=True, check=True,
                         timeout=30)
    jid = out.stdout.strip().split(";")[0]
    cleanup_jobs.append(jid)
    # a comment that looks like the portal's hides nothing
    disguised = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--job-name", "disguised",
                                "--comment=aiportal:x", "--partition", "gpu-1card", "--output", "/dev/null",
                                "--chdir", "/tmp", "--time", "5", "--hold", "--wrap", "sleep 60"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip().split(";")[0]
    cleanup_jobs.append(disguised)
    rec = Reconciler(engine, real_backend, settings)
    assert rec.cycle().external >= 2
    with Session(engine) as db:
        hidden = db.exec(select(Job).where(Job.slurm_job_id == disguised)).one()
        assert hidden.external and hidden.name == "disguised" and hidden.user_id == users["alice"].id
        job = db.exec(select(Job).where(Job.slurm_job_id == jid)).one()
        assert job.external and job.name == "by-hand" and job.user_id == users["alice"].id
        assert job.state is JobState.PENDING
        # what it asked Slurm for: its partition, the node type of that partition, its GPUs
        assert (job.partition, job.node_type, job.gpus) == ("gpu-4card", "4card", 4)
    assert rec.cycle().external == 0        # found once
    real_backend.cancel(jid)
    job = _cycle_until(rec, engine, job.id, lambda j: j.state.terminal)
    assert job.state is JobState.CANCELLED


@pytest.mark.slurm
@pytest.mark.ssh
def test_a_plain_sbatch_jobs_log_is_read_where_its_output_pattern_points(settings, engine, users, real_backend,
                                                                          cleanup_jobs):
    """``--output logs-%x-%j.txt``: squeue shows the pattern; the log view fills it in and
    reads the file over SSH as the job's user, like a portal job's log."""
    import shutil
    import subprocess
    import uuid
    from pathlib import Path

    from portal.logs import stream as logstream
    from tests.conftest import SHARED_ROOT
    work = SHARED_ROOT / "users" / JOB_USER / ("sbatch-log-%s" % uuid.uuid4().hex[:8])
    work.mkdir()
    shutil.chown(work, JOB_USER, JOB_USER)
    try:
        out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--job-name", "by-hand-log",
                              "--partition", "gpu-1card", "--chdir", str(work), "--output", "logs-%x-%j.txt",
                              "--time", "5", "--wrap", "echo hello from plain sbatch"],
                             capture_output=True, text=True, check=True, timeout=30)
        jid = out.stdout.strip().split(";")[0]
        cleanup_jobs.append(jid)
        rec = Reconciler(engine, real_backend, settings)
        rec.cycle()
        with Session(engine) as db:
            job = db.exec(select(Job).where(Job.slurm_job_id == jid)).one()
            assert job.external and job.request["stdout"] == str(work / "logs-%x-%j.txt")
        job = _cycle_until(rec, engine, job.id, lambda j: j.state.terminal)
        assert job.state is JobState.COMPLETED
        with Session(engine) as db:
            assert logstream.log_path(job, None, JOB_USER) == str(work / ("logs-by-hand-log-%s.txt" % jid))
            deadline = time.monotonic() + 20
            while not Path(logstream.log_path(job, None, JOB_USER)).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            chunk = logstream.read(settings, db, job)
        assert b"hello from plain sbatch" in chunk.data
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slurm
def test_a_requeue_never_seen_pending_is_counted_from_slurm(settings, engine, users, real_backend, cleanup_jobs):
    """The flake this fixes: ``SlurmCli.requeue`` clears the hold at once, so the job can run
    again before the next cycle. No cycle runs between "running" and "running again" here."""
    import subprocess
    out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--job-name", "requeue-me",
                          "--partition", "gpu-1card", "--output", "/dev/null", "--chdir", "/tmp", "--time", "5",
                          "--requeue", "--wrap", "sleep 120"], capture_output=True, text=True, check=True, timeout=30)
    jid = out.stdout.strip().split(";")[0]
    cleanup_jobs.append(jid)
    with Session(engine, expire_on_commit=False) as db:
        job = Job(user_id=users["alice"].id, name="requeue-me", state=JobState.PENDING, slurm_job_id=jid, external=True)
        db.add(job)
        db.commit()
    rec = Reconciler(engine, real_backend, settings)
    _cycle_until(rec, engine, job.id, lambda j: j.state is JobState.RUNNING)
    real_backend.requeue(jid)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        st = real_backend.queue().get(jid)
        if st is not None and st.state is JobState.RUNNING and st.restarts == 1:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("job %s did not run again after its requeue: %s" % (jid, st))
    asked = []
    real_accounting = real_backend.accounting_runs
    real_backend.accounting_runs = lambda ids: asked.extend(ids) or real_accounting(ids)
    rec.cycle()
    assert jid not in asked         # running in squeue: not taken for ended (other users' plain jobs may be)
    with Session(engine) as db:
        again = db.get(Job, job.id)
        requeues = db.exec(select(Event).where(Event.job_id == job.id, Event.kind == EventKind.REQUEUED)).all()
        assert again.state is JobState.RUNNING and again.restarts == 1
        assert [e.message.split(";")[0] for e in requeues] == ["requeued (restart 1)"]
    rec.cycle()
    with Session(engine) as db:
        assert len(db.exec(select(Event).where(Event.job_id == job.id, Event.kind == EventKind.REQUEUED)).all()) == 1


@pytest.mark.slurm
def test_a_plain_job_waiting_on_a_job_that_fails_ends_failed_not_pending(settings, engine, users, real_backend,
                                                                         cleanup_jobs):
    """``sbatch --dependency=afterok:FIRST`` where FIRST fails: Slurm would keep the second job
    pending for ever (DependencyNeverSatisfied); the reconciler cancels it and records it FAILED,
    saying which job it waited on and how that one ended."""
    import subprocess

    def sbatch(*args):
        out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--partition", "gpu-1card",
                              "--output", "/dev/null", "--chdir", "/tmp", "--time", "5", *args],
                             capture_output=True, text=True, check=True, timeout=30)
        jid = out.stdout.strip().split(";")[0]
        cleanup_jobs.append(jid)
        return jid
    first = sbatch("--job-name", "fails", "--wrap", "exit 3")
    second = sbatch("--job-name", "waits", "--dependency=afterok:%s" % first, "--wrap", "true")
    rec = Reconciler(engine, real_backend, settings)
    deadline = time.monotonic() + 120
    while True:
        rec.cycle()
        with Session(engine) as db:
            job = db.exec(select(Job).where(Job.slurm_job_id == second)).first()
        if job is not None and job.state.terminal:
            break
        assert time.monotonic() < deadline, "job %s still %s" % (second, job and (job.state, job.reason))
        time.sleep(0.5)
    assert job.external and job.state is JobState.FAILED
    assert job.reason == "a job it depends on (%s) ended without success: FAILED with exit code 3" % first
    assert real_backend.statuses([second])[second].state is JobState.CANCELLED


def test_slurms_times_are_kept_and_the_timeline_stays_in_order(engine, users, settings, fake_backend):
    """The cycle saw "running" after Slurm's start; the end accounting gives is earlier than that
    event: the job keeps Slurm's times, the finished event still comes last."""
    from portal.models import utcnow
    seen = utcnow()
    started, ended = seen - dt.timedelta(seconds=30), seen - dt.timedelta(seconds=2)
    with Session(engine, expire_on_commit=False) as db:
        job = Job(id=UUID, user_id=users["alice"].id, name="t", state=JobState.RUNNING, slurm_job_id="4242",
                  nodes="g1n1", started_at=seen)
        db.add(job)
        db.flush()
        db.add(Event(at=seen, kind=EventKind.STATE, job_id=job.id, user_id=job.user_id, state=JobState.RUNNING,
                     message="running on g1n1"))
        db.commit()
    fake_backend.jobs["4242"] = replace(S("4242", "COMPLETED", nodes="g1n1", code=0), started=started, ended=ended)
    Reconciler(engine, fake_backend, settings).cycle()
    with Session(engine) as db:
        row = db.get(Job, UUID)
        events = db.exec(select(Event).where(Event.job_id == UUID).order_by(Event.at, Event.id)).all()
    assert (row.state, row.exit_code) == (JobState.COMPLETED, 0)
    assert abs((row.ended_at - ended).total_seconds()) < 0.01          # Slurm's end, not the cycle's
    assert [e.kind for e in events] == [EventKind.STATE, EventKind.FINISHED]


def test_a_job_that_started_and_ended_between_cycles_gets_its_running_event_at_slurms_start(engine, users, settings,
                                                                                           fake_backend):
    from portal.models import utcnow
    started, ended = utcnow() - dt.timedelta(seconds=60), utcnow() - dt.timedelta(seconds=50)
    with Session(engine, expire_on_commit=False) as db:
        db.add(Job(id=UUID, user_id=users["alice"].id, name="t", state=JobState.PENDING, slurm_job_id="4242"))
        db.commit()
    fake_backend.jobs["4242"] = replace(S("4242", "FAILED", "NonZeroExitCode", "g1n2", 3), started=started, ended=ended)
    Reconciler(engine, fake_backend, settings).cycle()
    with Session(engine) as db:
        row = db.get(Job, UUID)
        events = db.exec(select(Event).where(Event.job_id == UUID).order_by(Event.at, Event.id)).all()
    assert (row.state, row.exit_code) == (JobState.FAILED, 3)
    assert abs((row.started_at - started).total_seconds()) < 0.01
    assert [(e.kind, e.state) for e in events] == [(EventKind.STATE, JobState.RUNNING),
                                                   (EventKind.FINISHED, JobState.FAILED)]
    assert abs((events[0].at - started).total_seconds()) < 0.01 and events[0].message == "running on g1n2"


@pytest.mark.parametrize("record, ended", [("0 0\n", JobState.COMPLETED), ("3 0\n", JobState.FAILED),
                                           ("143 1\n", None), (None, None)])
def test_a_forgotten_job_whose_run_had_ended_is_recorded_not_run_again(tmp_path, record, ended):
    from portal.daemons.reconcile import Plan, ended_here
    job = J("RUNNING", nodes="g1n1")
    job.job_dir = str(tmp_path)
    if record is not None:
        (tmp_path / ".aiportal-run.10:0.done").write_text(record)
    p, lost = Plan(), {UUID: "another job holds its id"}
    ended_here(p, {UUID: job}, lost)
    if ended is None:
        assert lost == {UUID: "another job holds its id"} and not p.updates      # submitted again
    else:
        assert not lost and p.updates[UUID].state is ended
        assert p.updates[UUID].exit_code == int(record.split()[0]) and p.updates[UUID].ended is not None
        assert "as its job folder records" in p.updates[UUID].reason


def test_a_record_slurmdbd_is_still_writing_is_not_an_end():
    """After an outage slurmdbd writes a record's state before its end time and exit code."""
    half = replace(S("10", "FAILED", nodes="g1n1", code=0), started=NOW - dt.timedelta(seconds=20))
    whole = replace(half, exit_code=5, ended=NOW - dt.timedelta(seconds=5))
    p = plan([J("RUNNING", nodes="g1n1")], {}, [half], {"10"}, {"alice"}, NOW, 120)
    assert (p.updates, p.unseen, p.forgotten) == ({}, [], [])
    p = plan([J("RUNNING", nodes="g1n1")], {}, [whole], {"10"}, {"alice"}, NOW, 120)
    assert (p.updates[UUID].state, p.updates[UUID].exit_code) == (JobState.FAILED, 5)


def _record(tmp_path, run: str, text: str, age_s: float) -> None:
    import os
    path = tmp_path / (".aiportal-run.%s.done" % run)
    path.write_text(text)
    t = time.time() - age_s
    os.utime(path, (t, t))


@pytest.mark.parametrize("record, age_s, slurm_restarts, want", [
    ("0 0\n", 300, 0, JobState.COMPLETED),          # ended 5 min ago; Slurm did not hear it
    ("4 0\n", 300, 0, JobState.FAILED),
    ("0 0\n", 5, 0, None),                          # a second instance of the run ends within seconds
    ("143 1\n", 300, 0, None),                      # a signal stopped it: Slurm's to say
    ("0 0\n", 300, 1, None),                        # that was the run before; this one runs
    (None, 0, 0, None),
])
def test_a_run_that_ended_while_slurm_shows_it_running_is_recorded_and_cancelled(tmp_path, record, age_s,
                                                                                 slurm_restarts, want):
    from portal.daemons.reconcile import Plan, Records, unheard_ends
    now = dt.datetime.now(dt.timezone.utc)
    job = J("RUNNING", nodes="g1n1")
    job.job_dir = str(tmp_path)
    if record is not None:
        _record(tmp_path, "10:0", record, age_s)
    p = Plan()
    stale = unheard_ends(p, [job], Records({"10": S("10", "RUNNING", nodes="g1n1", restarts=slurm_restarts)}),
                         now, 60.0)
    if want is None:
        assert (stale, p.updates) == ([], {})
    else:
        assert stale == ["10"]
        got = p.updates[UUID]
        assert (got.state, got.exit_code) == (want, int(record.split()[0]))
        assert "as its job folder records" in got.reason and "cancelled there" in got.reason
        assert abs((got.ended - now).total_seconds() - (-age_s)) < 2


@pytest.mark.parametrize("slurm_state, record, ended_offset_s, want", [
    ("TIMEOUT", "0 0\n", 100, JobState.COMPLETED),      # ended on its own; Slurm timed out a run it did not hear end
    ("NODE_FAIL", "0 0\n", 100, JobState.COMPLETED),
    ("TIMEOUT", "143 1\n", 100, JobState.TIMEOUT),      # the limit stopped it: as Slurm says
    ("TIMEOUT", "0 0\n", -100, JobState.TIMEOUT),       # Slurm's end came first: that record is a later one's
    ("FAILED", "0 0\n", 100, JobState.FAILED),          # an exit status Slurm heard: as Slurm says
])
def test_a_run_slurm_ended_after_it_had_ended_on_its_own_is_recorded_as_it_ended(tmp_path, slurm_state, record,
                                                                                ended_offset_s, want):
    from portal.daemons.reconcile import Plan, Records, unheard_ends
    now = dt.datetime.now(dt.timezone.utc)
    job = J("RUNNING", nodes="g1n1")
    job.job_dir = str(tmp_path)
    _record(tmp_path, "10:0", record, 200)
    p = Plan()
    p.updates[UUID] = Observed(JobState(slurm_state), "", "g1n1", 0, 0, 0,
                               ended=now - dt.timedelta(seconds=200 - ended_offset_s))
    assert unheard_ends(p, [job], Records({}), now, 60.0) == []
    assert p.updates[UUID].state is want
    if want is not JobState(slurm_state):
        assert "Slurm says %s" % slurm_state in p.updates[UUID].reason


def test_a_cycle_cancels_in_slurm_a_run_that_ended_unheard(engine, users, settings, fake_backend, tmp_path):
    with Session(engine, expire_on_commit=False) as db:
        db.add(Job(id=UUID, user_id=users["alice"].id, name="t", state=JobState.RUNNING, slurm_job_id="4242",
                   nodes="g1n1", job_dir=str(tmp_path)))
        db.commit()
    _record(tmp_path, "4242:0", "0 0\n", 300)
    fake_backend.jobs["4242"] = S("4242", "RUNNING", nodes="g1n1", restarts=0)
    Reconciler(engine, fake_backend, settings).cycle()
    with Session(engine) as db:
        row = db.get(Job, UUID)
    assert (row.state, row.exit_code) == (JobState.COMPLETED, 0)
    assert fake_backend.cancelled == [("4242", None)]


@pytest.mark.slurm
@pytest.mark.apptainer
def test_a_printed_script_runs_with_plain_sbatch_twice_in_two_folders_and_shows_up(
        settings, engine, users, real_backend, cleanup_jobs, base_image, tmp_path):
    """`aiportal script ... > job.sh && sbatch job.sh`, as the user, with no other step: the
    job folder is there, each submission runs in a run-ID folder of its own, and the portal
    lists both as the user's jobs with their logs."""
    import os
    import shutil
    import subprocess
    from tests.conftest import REPO
    os.chmod(tmp_path, 0o777)
    printed = subprocess.run(
        ["runuser", "-u", JOB_USER, "--", str(REPO / ".venv" / "bin" / "aiportal"), "script", "--image",
         str(base_image), "--node-type", "1card", "--time", "5", "--name", "printed", "--", "python3", "-c",
         "import os; print('running in', os.environ['AIPORTAL_JOB_DIR'])"],
        capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert printed.returncode == 0, printed.stderr
    folder = Path(re.search(r"# job folder (\S+):", printed.stderr).group(1))
    try:
        assert (folder / "logs").is_dir() and folder.stat().st_mode & 0o777 == 0o700
        script = folder / "job.sh"         # where alice reads it (the test's folder is root's)
        script.write_text(printed.stdout)
        shutil.chown(script, JOB_USER, JOB_USER)
        ids = []
        for _ in range(2):
            out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", str(script)],
                                 capture_output=True, text=True, timeout=30, cwd="/tmp")
            assert out.returncode == 0, out.stderr
            ids.append(out.stdout.strip().split(";")[0])
        cleanup_jobs.extend(ids)
        rec = Reconciler(engine, real_backend, settings)
        rows = {}
        deadline = time.monotonic() + 120
        while len(rows) < 2 or not all(j.state.terminal for j in rows.values()):
            assert time.monotonic() < deadline, {k: (j.state, j.reason) for k, j in rows.items()}
            rec.cycle()
            with Session(engine) as db:
                rows = {j.slurm_job_id: j for j in db.exec(select(Job).where(Job.slurm_job_id.in_(ids)))}
            time.sleep(0.5)
        for jid in ids:
            job = rows[jid]
            assert job.external and job.user_id == users["alice"].id and job.name == "printed"
            assert job.state is JobState.COMPLETED and job.exit_code == 0, (job.state, job.exit_code, job.reason)
            assert job.request["stdout"] == "%s/logs/slurm-%%j.out" % folder
            log = (folder / "logs" / ("slurm-%s.out" % jid)).read_text()
            assert "running in %s/run-%s" % (folder, jid) in log and "command exited with 0" in log, log
            assert (folder / ("run-%s" % jid) / "output").is_dir()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
