"""Finishing a pending stage-out from the portal (portal/services/stage_out.py): the pure parts as
tables, the API and the job page on an in-memory database with a recording Slurm backend (the
finishing job's script is checked, not run; tests/faults/test_stage_out_store_down.py runs it on
the cluster), the reconciler's check and the credentials sweep on real job folders."""
from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.daemons.reconcile import Reconciler
from portal.models import Event, EventKind, Job, User, utcnow
from portal.models.stage_out import FinishState, PendingStageOut, StageOutFinish
from portal.services import datasources
from portal.services.stage_out import (OPEN_KEY, Cursor, PendingRecord, StageOuts, check_finishes, check_records,
                                       failure_reason, finish_argv, keep_expired, sweep_credentials)
from portal.services.submit import prepare_job_dir
from slurm.errors import SubmitError
from slurm.jobs import JobStatus
from slurm.states import JobState
from storage.credentials import JOB_CREDENTIALS_NAME, DataSource, SecretBox, read_credentials_file, write_job_credentials
from storage.stage import stage_out
from storage.errors import StageOutPendingError
from tests.conftest import REPO

from .conftest import bearer, csrf_of, login
from .test_postgres import pg_engine, pg_url  # noqa: F401 (fixtures: a throwaway PostgreSQL)

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
JD = "/srv/x/users/alice/jobs/J"


# -- pure parts -------------------------------------------------------------------------------------

def R(source, dest, state="failed", reason="", started=""):
    return PendingRecord(source, dest, state, reason, started)


@pytest.mark.parametrize("records", [
    [R(JD + "/output", "s3://b/out")],
    [R(JD + "/output/", "s3://b/out")],                                      # normalised
    [R(JD + "/output/task-0", "s3://b/out/task-0"), R(JD + "/output/task-12", "s3://b/out/task-12")],
])
def test_records_of_the_jobs_own_output_are_accepted(records):
    checked = check_records(JD, "s3://b/out", records)
    assert [r.source for r in checked] == [r.source.rstrip("/") for r in records]     # written plainly


@pytest.mark.parametrize("records, output, words", [
    ([R("/etc", "s3://b/out")], "s3://b/out", "does not stage this job's output folder"),
    ([R(JD + "/output/../../K/output", "s3://b/out")], "s3://b/out", "does not stage this job's output folder"),
    ([R(JD + "/data", "s3://b/out")], "s3://b/out", "does not stage this job's output folder"),
    ([R(JD + "/output/task-x", "s3://b/out/task-x")], "s3://b/out", "does not stage"),
    ([R(JD + "/output", "s3://evil/out")], "s3://b/out", "not to the job's output s3://b/out"),
    ([R(JD + "/output/task-1", "s3://b/out/task-2")], "s3://b/out", "not to the job's output s3://b/out/task-1"),
    ([R(JD + "/output", "s3://b/out")], None, "no output location"),
])
def test_records_that_stage_anything_else_are_refused(records, output, words):
    from portal.errors import ConflictError
    with pytest.raises(ConflictError, match=re.escape(words)):
        check_records(JD, output, records)


def test_finish_argv_is_one_stage_out_with_a_pair_per_record():
    recs = [R(JD + "/output/task-0", "s3://b/o/task-0"), R(JD + "/output/task-1", "s3://b/o/task-1")]
    assert finish_argv("/opt/a/aiportal", recs, JD + "/" + JOB_CREDENTIALS_NAME) == [
        "/opt/a/aiportal", "stage", "out", "--from", JD + "/output/task-0", "--to", "s3://b/o/task-0",
        "--from", JD + "/output/task-1", "--to", "s3://b/o/task-1", "--credentials", JD + "/.aiportal-credentials.json"]
    assert finish_argv("aiportal", recs[:1], None)[-2:] == ["--to", "s3://b/o/task-0"]


ATTEMPT = StageOutFinish(state=FinishState.RUNNING, requested_at=T0, requested_by="alice", slurm_job_id="55")


@pytest.mark.parametrize("records, status, want", [
    # this attempt's own error, from its record
    ([R(JD, "s3://b", "failed", "the store at http://x is unavailable after 6 attempts", "2026-12-01T12:00:05+00:00")],
     JobStatus("55", JobState.FAILED, exit_code=2), "the store at http://x is unavailable after 6 attempts"),
    # a record from before the attempt: its job never got to `stage out`
    ([R(JD, "s3://b", "failed", "old reason", "2026-12-01T11:00:00+00:00")],
     JobStatus("55", JobState.CANCELLED), "the finishing job 55 ended CANCELLED before the stage-out finished"),
    ([R(JD, "s3://b", "in_progress", "", "2026-12-01T12:00:05+00:00")],
     JobStatus("55", JobState.TIMEOUT), "ended TIMEOUT before"),
    ([R(JD, "s3://b", "failed", "old", "2026-12-01T11:00:00+00:00")], None, "Slurm no longer knows it"),
])
def test_failure_reason(records, status, want):
    assert want in failure_reason(records, ATTEMPT, status)


def test_stored_document_round_trip_and_the_reconcilers_list_form():
    assert PendingStageOut.load(None) is None and PendingStageOut.load("") is None
    listed = PendingStageOut.load(json.dumps([{"source": "/a", "destination": "s3://b"}]))
    assert listed.records == ({"source": "/a", "destination": "s3://b"},) and listed.finish is None
    doc = PendingStageOut(records=({"source": "/a"},), finish=ATTEMPT)
    again = PendingStageOut.load(doc.dump())
    assert again == doc and again.finish.open and json.loads(doc.dump())["format"] == "aiportal-stage-out/1"
    # never "nothing pending" for a value that is there but unreadable
    assert PendingStageOut.load("{not json").records and PendingStageOut.load('{"records": 3}').records


@pytest.mark.parametrize("keep, ended, want", [
    (7.0, T0 - dt.timedelta(days=7), True),                              # exactly the keep time
    (7.0, T0 - dt.timedelta(days=7) + dt.timedelta(seconds=1), False),
    (7.0, None, False),
    (0.0, T0 - dt.timedelta(days=700), False),                           # 0: kept for ever
    (0.5, T0 - dt.timedelta(hours=12), True),
])
def test_keep_expired_boundaries(settings, keep, ended, want):
    from dataclasses import replace
    assert keep_expired(replace(settings, job_credentials_keep_days=keep), Job(id="j", user_id=1, name="x",
                                                                              ended_at=ended), T0) is want


# -- a finished job whose stage-out is pending, on a real folder -----------------------------------

def _record(job_dir: Path, dest: str, source: Path | None = None, reason: str = "the store is down",
            started: str = "2026-01-01T00:00:00+00:00", name: str = "output") -> dict:
    """A record as storage.stage writes it (the tests that need the real thing call stage_out)."""
    source = source or job_dir / "output"
    rec = {"state": "failed", "source": str(source), "destination": dest, "started": started, "host": "g1n1",
           "pid": 1, "reason": reason, "retry": ["aiportal", "stage", "out", "--from", str(source), "--to", dest],
           "failed": started, "code": "store_unavailable"}
    path = (job_dir if source == job_dir / "output" else source.parent) / ("STAGE_OUT_PENDING.%s.json" % name)
    path.write_text(json.dumps(rec))
    return rec


def make_pending(engine, settings, user: User, output: str, *, creds: bool = True, ended: dt.datetime | None = None,
                 record: bool = True) -> Job:
    job_id = str(uuid.uuid4())
    job_dir = prepare_job_dir(settings, user.unix_user, job_id)
    (job_dir / "output" / "model.bin").write_bytes(os.urandom(1000))
    records = [_record(job_dir, output)] if record else []
    if creds:
        write_job_credentials(job_dir, [DataSource("old", "http://127.0.0.1:9", "us-east-1", "AKOLDKEY1", "oldsecret")],
                              user=user.unix_user)
    job = Job(id=job_id, user_id=user.id, name="t", state=JobState.FAILED, slurm_job_id="77", partition="gpu-1card",
              job_dir=str(job_dir), exit_code=91, request_json=json.dumps({"command": ["true"], "output": output}),
              ended_at=ended or utcnow(), stage_out_pending=json.dumps(records) if records else None)
    with Session(engine, expire_on_commit=False) as db:
        db.add(job)
        db.commit()
    return job


def _job(engine, job_id: str) -> Job:
    with Session(engine, expire_on_commit=False) as db:
        return db.get(Job, job_id)


def _events(engine, job_id: str) -> list[Event]:
    with Session(engine, expire_on_commit=False) as db:
        return list(db.exec(select(Event).where(Event.job_id == job_id, Event.kind == EventKind.STAGE_OUT)
                            .order_by(Event.id)))


def _script_argv(script: str) -> list[str]:
    import shlex
    return shlex.split(script.strip().splitlines()[-1])[1:]       # `exec ARGV`


def test_finish_through_the_api_runs_stage_out_as_the_owner_then_clears(client, engine, settings, users, tokens,
                                                                       fake_backend):
    out = "%s/users/alice/results/r1" % settings.shared_root
    job = make_pending(engine, settings, users["alice"], out)
    creds = Path(job.job_dir) / JOB_CREDENTIALS_NAME
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 202, r.get_json()
    ans = r.get_json()
    assert ans["stage_out_finish"]["state"] == "running" and ans["stage_out_finish"]["slurm_job_id"] == "1001"
    assert ans["stage_out_finish"]["requested_by"] == "alice"
    assert ans["stage_out_pending"][0]["destination"] == out
    [(script, as_user)] = fake_backend.submitted
    assert as_user == "alice"
    for line in ("#SBATCH --partition=gpu-1card", "#SBATCH --comment=aiportal:stage-out",
                 "#SBATCH --output=%s/logs/stage-out.out" % job.job_dir, "#SBATCH --open-mode=append",
                 "#SBATCH --time=01:00:00"):
        assert line in script.splitlines(), script
    # a shared-filesystem output needs no keys: the job's file is left alone, not passed
    assert _script_argv(script) == [settings.stage_bin, "stage", "out", "--from", job.job_dir + "/output", "--to", out]
    assert creds.exists()
    # one attempt at a time; others' jobs are not found; the log reads as empty before it writes
    again = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert again.status_code == 409 and "being finished already (Slurm job 1001" in again.get_json()["message"]
    assert client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["bob"])).status_code == 404
    assert client.get("/api/v1/jobs/%s/stage-out/log" % job.id, headers=bearer(tokens["bob"])).status_code == 404
    [requested] = _events(engine, job.id)
    assert requested.key == OPEN_KEY + job.id
    assert requested.message == ("finish stage-out requested by alice: Slurm job 1001 runs `aiportal stage out` as "
                                 "alice (log: logs/stage-out.out)")

    # still running: nothing changes
    assert check_finishes(Session(engine), settings, fake_backend) == 0
    # the finishing job did its work (the record goes once everything arrived) and ended
    (Path(job.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()
    fake_backend.jobs["1001"] = JobStatus("1001", JobState.COMPLETED, exit_code=0)
    with Session(engine) as db:
        assert check_finishes(db, settings, fake_backend) == 1
    shown = client.get("/api/v1/jobs/%s" % job.id, headers=bearer(tokens["alice"])).get_json()
    assert shown["stage_out_pending"] is None and shown["stage_out_finish"] is None
    assert shown["state"] == "FAILED" and shown["exit_code"] == 91            # what Slurm said stays
    assert not creds.exists()
    kinds = [(e["kind"], e["message"]) for e in shown["events"] if e["kind"] == "stage_out"]
    assert kinds[-1] == ("stage_out", "stage-out finished: the outputs are at %s; the credentials file was removed"
                         % out)
    assert all(e.key is None for e in _events(engine, job.id))               # the claim is released
    nothing = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert nothing.status_code == 409 and "has no pending stage-out" in nothing.get_json()["message"]
    assert len(fake_backend.submitted) == 1


def test_a_failed_attempt_says_why_and_can_be_tried_again(client, engine, settings, users, tokens, fake_backend):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r2" % settings.shared_root)
    assert client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"])).status_code == 202
    # the store is still down: `stage out` rewrote the record with this attempt's error
    later = (utcnow() + dt.timedelta(seconds=5)).isoformat(timespec="seconds")
    _record(Path(job.job_dir), job.request["output"], reason="the store at http://s3 is unavailable after 6 attempts",
            started=later)
    fake_backend.jobs["1001"] = JobStatus("1001", JobState.FAILED, exit_code=2)
    with Session(engine) as db:
        assert check_finishes(db, settings, fake_backend) == 1
    shown = client.get("/api/v1/jobs/%s" % job.id, headers=bearer(tokens["alice"])).get_json()
    assert shown["stage_out_pending"] and shown["stage_out_finish"]["state"] == "failed"
    assert shown["stage_out_finish"]["reason"] == "the store at http://s3 is unavailable after 6 attempts"
    assert shown["events"][-1]["message"].startswith("finish stage-out failed: the store at http://s3 is unavailable")
    assert (Path(job.job_dir) / JOB_CREDENTIALS_NAME).exists()          # kept: the job ended minutes ago
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 202 and r.get_json()["stage_out_finish"]["slurm_job_id"] == "1002"


def test_an_admin_may_finish_it_and_it_runs_as_the_owner(client, engine, settings, users, tokens, fake_backend):
    job = make_pending(engine, settings, users["bob"], "%s/users/bob/r" % settings.shared_root)
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["root-admin"]))
    assert r.status_code == 202 and r.get_json()["stage_out_finish"]["requested_by"] == "root-admin"
    assert fake_backend.submitted[0][1] == "bob"


def test_missing_credentials_are_written_fresh_from_the_owners_data_sources(client, engine, settings, users, tokens,
                                                                           fake_backend):
    source = DataSource("lab", "http://127.0.0.1:9000", "us-east-1", "AKIAFRESHKEY123", "fresh-secret-xyz",
                        buckets=("results",))
    with Session(engine) as db:
        datasources.add_source(db, SecretBox(settings.data_key), db.get(User, users["alice"].id), source)
        db.commit()
    job = make_pending(engine, settings, users["alice"], "s3://results/run1", creds=False)
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 202, r.get_json()
    creds = Path(job.job_dir) / JOB_CREDENTIALS_NAME
    st = creds.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pwd.getpwnam("alice").pw_uid
    assert read_credentials_file(creds) == {"lab": source}
    script = fake_backend.submitted[0][0]
    assert _script_argv(script)[-2:] == ["--credentials", str(creds)]
    assert "fresh-secret-xyz" not in script and "AKIAFRESHKEY123" not in script
    assert "with a fresh credentials file from the data sources" in _events(engine, job.id)[0].message
    everything = json.dumps(r.get_json())
    with engine.connect() as conn:
        for table in ("jobs", "events"):
            everything += "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM %s" % table))
    assert "fresh-secret-xyz" not in everything and "AKIAFRESHKEY123" not in everything


def test_an_existing_credentials_file_is_used_as_it_is(client, engine, settings, users, tokens, fake_backend):
    job = make_pending(engine, settings, users["alice"], "s3://results/run2")
    before = (Path(job.job_dir) / JOB_CREDENTIALS_NAME).read_bytes()
    assert client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"])).status_code == 202
    assert (Path(job.job_dir) / JOB_CREDENTIALS_NAME).read_bytes() == before
    assert "--credentials" in _script_argv(fake_backend.submitted[0][0])


def test_no_data_source_for_the_output_refuses_and_releases_the_claim(client, engine, settings, users, tokens,
                                                                     fake_backend):
    job = make_pending(engine, settings, users["alice"], "s3://nobodys/run", creds=False)
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 400 and "bucket" in r.get_json()["message"], r.get_json()
    assert fake_backend.submitted == []
    finish = PendingStageOut.load(_job(engine, job.id).stage_out_pending).finish
    assert finish.state is FinishState.FAILED and "was not submitted" in finish.reason
    assert all(e.key is None for e in _events(engine, job.id))


def test_a_refused_submission_fails_the_attempt(client, engine, settings, users, tokens, fake_backend, monkeypatch):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r3" % settings.shared_root)

    def refuse(script, user=None):
        raise SubmitError(["sbatch"], 1, "", "sbatch: error: invalid partition specified")
    monkeypatch.setattr(fake_backend, "submit", refuse)
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 422 and "invalid partition" in r.get_json()["message"]
    doc = PendingStageOut.load(_job(engine, job.id).stage_out_pending)
    assert doc.finish.state is FinishState.FAILED and "invalid partition" in doc.finish.reason
    assert _events(engine, job.id)[-1].message.startswith("finish stage-out failed: the finishing job was not submitted")


@pytest.mark.parametrize("case", ["running", "external", "nothing"])
def test_nothing_to_finish_is_a_conflict(client, engine, settings, users, tokens, fake_backend, case):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r4" % settings.shared_root,
                       record=case != "nothing")
    with Session(engine) as db:
        row = db.get(Job, job.id)
        if case == "running":
            row.state = JobState.RUNNING
        if case == "external":
            row.external = True
        db.add(row)
        db.commit()
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 409 and r.get_json()["error"] == "conflict"
    assert fake_backend.submitted == []


def test_a_stage_out_finished_by_hand_is_cleared_when_asked(client, engine, settings, users, tokens, fake_backend):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r5" % settings.shared_root)
    (Path(job.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()        # `aiportal stage out` from a shell
    r = client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"]))
    assert r.status_code == 409 and "finished outside the portal" in r.get_json()["message"]
    assert _job(engine, job.id).stage_out_pending is None
    assert not (Path(job.job_dir) / JOB_CREDENTIALS_NAME).exists() and fake_backend.submitted == []


def test_an_attempt_whose_submission_never_happened_times_out(engine, settings, users, fake_backend):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r6" % settings.shared_root)
    old = utcnow() - dt.timedelta(seconds=settings.submit_grace_s + 5)
    with Session(engine) as db:
        row = db.get(Job, job.id)
        row.stage_out_pending = PendingStageOut(records=tuple(json.loads(row.stage_out_pending)), finish=StageOutFinish(
            state=FinishState.SUBMITTING, requested_at=old, requested_by="alice")).dump()
        db.add(row)
        db.add(Event(at=old, kind=EventKind.STAGE_OUT, job_id=job.id, user_id=row.user_id, key=OPEN_KEY + job.id,
                     message="finish stage-out requested by alice"))
        db.commit()
        assert check_finishes(db, settings, fake_backend) == 1
    finish = PendingStageOut.load(_job(engine, job.id).stage_out_pending).finish
    assert finish.state is FinishState.FAILED and finish.reason == "the portal stopped before it submitted the finishing job"


def test_the_reconciler_cycle_notices_the_finishing_job_ended(client, engine, settings, users, tokens, fake_backend):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r7" % settings.shared_root)
    assert client.post("/api/v1/jobs/%s/stage-out" % job.id, headers=bearer(tokens["alice"])).status_code == 202
    (Path(job.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()
    fake_backend.jobs["1001"] = JobStatus("1001", JobState.COMPLETED, exit_code=0)
    Reconciler(engine, fake_backend, settings).cycle()
    assert _job(engine, job.id).stage_out_pending is None


def test_the_job_page_offers_the_button_with_csrf_and_says_what_it_does(client, engine, settings, users,
                                                                          fake_backend):
    job = make_pending(engine, settings, users["alice"], "%s/users/alice/r8" % settings.shared_root)
    assert login(client).status_code == 302
    page = client.get("/jobs/%s" % job.id).get_data(as_text=True)
    assert 'id="finish-stage-out"' in page and 'id="stage-out-help"' in page
    assert "runs <code>aiportal stage out</code> as the job's Unix user" in page
    assert "removed 7 days after the job ended" in page
    assert client.post("/jobs/%s/stage-out" % job.id, data={}).status_code == 400
    r = client.post("/jobs/%s/stage-out" % job.id, data={"csrf": csrf_of(client, "/jobs/%s" % job.id)})
    assert r.status_code == 302 and fake_backend.submitted
    page = client.get("/jobs/%s" % job.id).get_data(as_text=True)
    assert "finishing the stage-out in Slurm job 1001" in page
    assert 'id="stage-out-status" data-state="running"' in page and 'id="finish-stage-out"' not in page
    assert 'id="stage-out-log"' in page


# -- the sweep ---------------------------------------------------------------------------------------

def _creds(job: Job) -> Path:
    return Path(job.job_dir) / JOB_CREDENTIALS_NAME


def test_sweep_removes_old_credentials_once_and_leaves_recent_ones(engine, settings, users):
    now = utcnow()
    old = [make_pending(engine, settings, users["alice"], "/x", record=False, ended=now - dt.timedelta(days=8))
           for _ in range(3)]
    recent = make_pending(engine, settings, users["alice"], "/x", record=False, ended=now - dt.timedelta(days=6))
    pending_old = make_pending(engine, settings, users["alice"], "%s/users/alice/p" % settings.shared_root,
                               ended=now - dt.timedelta(days=9))
    with Session(engine) as db:
        for j in old:             # same end time: the cursor goes by (ended_at, id)
            row = db.get(Job, j.id)
            row.ended_at = now - dt.timedelta(days=8)
            db.add(row)
        db.commit()
        first = sweep_credentials(db, settings, now, Cursor(now - dt.timedelta(days=40)), batch=2)
        assert first.more and first.removed == 3          # 2 from the batch + the pending job's
        second = sweep_credentials(db, settings, now, first.cursor, batch=2)
        assert not second.more and second.removed == 1 and second.cursor == Cursor(now - dt.timedelta(days=7))
        third = sweep_credentials(db, settings, now, second.cursor, batch=2)
        assert third.removed == 0
    assert not any(_creds(j).exists() for j in old) and _creds(recent).exists()
    assert not _creds(pending_old).exists()
    # the pending stage-out itself stays: finishing it writes fresh credentials
    assert PendingStageOut.load(_job(engine, pending_old.id).stage_out_pending).records
    assert "still pending (finishing it writes a fresh one" in _events(engine, pending_old.id)[-1].message
    assert _events(engine, old[0].id)[-1].message == "the credentials file was removed 7 days after the job ended"


def test_sweep_clears_a_stage_out_finished_outside_and_skips_open_attempts(client, engine, settings, users, tokens,
                                                                         fake_backend):
    done = make_pending(engine, settings, users["alice"], "%s/users/alice/d" % settings.shared_root)
    (Path(done.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()
    busy = make_pending(engine, settings, users["alice"], "%s/users/alice/b" % settings.shared_root)
    assert client.post("/api/v1/jobs/%s/stage-out" % busy.id, headers=bearer(tokens["alice"])).status_code == 202
    (Path(busy.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()      # its job is still running
    gone = make_pending(engine, settings, users["alice"], "%s/users/alice/g" % settings.shared_root)
    import shutil
    shutil.rmtree(gone.job_dir)
    with Session(engine) as db:
        res = sweep_credentials(db, settings, utcnow(), Cursor(utcnow()))
    assert res.cleared == 2
    assert _job(engine, done.id).stage_out_pending is None and not _creds(done).exists()
    assert _events(engine, done.id)[-1].message.startswith("stage-out finished outside the portal: the outputs are at")
    assert _job(engine, busy.id).stage_out_pending is not None
    assert _job(engine, gone.id).stage_out_pending is None
    assert _events(engine, gone.id)[-1].message.startswith("the job's folder is gone: nothing is left to stage out")


def test_the_step_sweeps_once_an_hour(engine, settings, users, fake_backend, monkeypatch):
    calls = []
    import portal.services.stage_out as mod
    real = mod.sweep_credentials
    monkeypatch.setattr(mod, "sweep_credentials", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    step = StageOuts(engine, fake_backend, settings)
    step.cycle()
    step.cycle()
    assert len(calls) == 1 and calls[0].ended_at < utcnow() - dt.timedelta(days=36)   # a new process looks back


# -- `aiportal stage out` with several folders (what the finishing job runs) ------------------------

def test_stage_out_of_several_folders_goes_on_after_one_fails(tmp_path):
    job = tmp_path / "job"
    for task in ("task-0", "task-1", "task-2"):
        (job / "output" / task).mkdir(parents=True)
        (job / "output" / task / "w.bin").write_bytes(os.urandom(100))
    (tmp_path / "blocked").write_text("a file, not a folder")
    dests = [tmp_path / "dest" / "task-0", tmp_path / "blocked" / "task-1", tmp_path / "dest" / "task-2"]
    argv = [AIPORTAL, "stage", "out"]
    for task, dest in zip(("task-0", "task-1", "task-2"), dests):
        argv += ["--from", str(job / "output" / task), "--to", str(dest)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert (dests[0] / "w.bin").exists() and (dests[2] / "w.bin").exists()
    assert "aiportal: stage out: 1 of 3 folders are still pending (%s)" % (job / "output" / "task-1") in res.stderr
    assert (job / "output" / "STAGE_OUT_PENDING.task-1.json").exists()
    assert not (job / "output" / "STAGE_OUT_PENDING.task-0.json").exists()
    bad = subprocess.run([AIPORTAL, "stage", "out", "--from", "a", "--to", "b", "--from", "c"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "give one --to URI after each --from DIR" in bad.stderr


def test_a_real_pending_record_is_finished_by_the_argv_the_portal_builds(tmp_path, settings):
    """The record storage.stage writes passes check_records, and the argv built from it finishes
    the stage-out (here on the shared filesystem, as this user)."""
    job = tmp_path / "job"
    (job / "output").mkdir(parents=True)
    (job / "output" / "m.bin").write_bytes(os.urandom(5000))
    (tmp_path / "later").write_text("in the way")
    dest = str(tmp_path / "later" / "out")
    with pytest.raises(StageOutPendingError):
        stage_out(str(job / "output"), dest)
    from storage.stage import pending_stage_outs
    records = [PendingRecord.of(r) for r in pending_stage_outs(job)]
    check_records(str(job), dest, records)
    (tmp_path / "later").unlink()
    res = subprocess.run(finish_argv(AIPORTAL, records, None), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert pending_stage_outs(job) == [] and Path(dest, "m.bin").read_bytes() == (job / "output" / "m.bin").read_bytes()


# -- the claim's key on both databases ---------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
def any_engine(request, engine):
    if request.param == "sqlite":
        return engine
    request.applymarker(pytest.mark.postgres)
    return request.getfixturevalue("pg_engine")


def test_open_claims_are_one_key_range_and_a_claim_is_taken_once(any_engine, settings, fake_backend):
    from portal.errors import ConflictError
    from portal.services import accounts
    from portal.services.stage_out import open_claims, open_key, request_finish
    with Session(any_engine, expire_on_commit=False) as db:
        alice = accounts.add_user(db, "alice", "alice")
        db.commit()
    job = make_pending(any_engine, settings, alice, "%s/users/alice/pg" % settings.shared_root)
    with Session(any_engine, expire_on_commit=False) as db:
        for key in ("stage-out:opened", "stage-out:open", "stage-out:open;x", "requeue:1:0", open_key(job.id)):
            db.add(Event(kind=EventKind.STAGE_OUT, job_id=job.id, user_id=alice.id, key=key, message="x"))
        db.commit()
        assert [e.key for e in open_claims(db)] == [open_key(job.id)]
        # the row says nothing runs, but the claim is there: the unique key refuses a second one
        with pytest.raises(ConflictError, match="being finished already"):
            request_finish(db, settings, fake_backend, SecretBox(settings.data_key), alice, db.get(Job, job.id))
        claim = open_claims(db)[0]
        claim.key = None
        db.add(claim)
        db.commit()
        request_finish(db, settings, fake_backend, SecretBox(settings.data_key), alice, db.get(Job, job.id))
        (Path(job.job_dir) / "STAGE_OUT_PENDING.output.json").unlink()
        fake_backend.jobs["1001"] = JobStatus("1001", JobState.COMPLETED, exit_code=0)
        assert check_finishes(db, settings, fake_backend) == 1
        assert db.get(Job, job.id, populate_existing=True).stage_out_pending is None and open_claims(db) == []
