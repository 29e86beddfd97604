"""`aiportal stage finish JOB --wait` against the live test portal (gunicorn + reconciler) on the
dev cluster: the finishing job really runs `aiportal stage out` as alice in Slurm, the CLI prints
its log as it goes and exits 0 once the portal has seen nothing is pending (1, with the reason,
when the destination is still refused).

The job is one that ended with a pending stage-out to the shared filesystem: its folder made as
the portal makes it, the record written by a real `aiportal stage out` run as alice into a
folder she may not write (the "store" that is down), the row stored as the reconciler leaves
it. tests/faults/test_stage_out_store_down.py does the same with a real job and an S3 store."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Job, User, utcnow
from portal.services.submit import prepare_job_dir
from portal.settings import Settings
from slurm.states import JobState
from storage.credentials import JOB_CREDENTIALS_NAME, DataSource, write_job_credentials
from storage.stage import pending_stage_outs
from tests.conftest import JOB_AIPORTAL_VENV, SHARED_ROOT
from tests.portal.conftest import _remove_job_folders

pytestmark = [pytest.mark.portal, pytest.mark.slurm]
AIPORTAL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "aiportal")


@dataclass
class PendingJob:
    id: str
    dir: Path
    dest: Path
    blocked: Path

    def unblock(self) -> None:
        """The "store" is back: the destination's folder becomes alice's."""
        pw = pwd.getpwnam("alice")
        os.chown(self.blocked, pw.pw_uid, pw.pw_gid)


@pytest.fixture
def pending_jobs(live_portal):
    """A factory of alice's jobs that ended with a stage-out pending to a folder she may not
    write yet; folders removed afterwards."""
    settings = Settings.load(live_portal.config)
    made: list[PendingJob] = []
    pw = pwd.getpwnam("alice")

    def make() -> PendingJob:
        job_id = str(uuid.uuid4())
        job_dir = prepare_job_dir(settings, "alice", job_id)
        for rel, size in (("model.bin", 300_000), ("ckpt/step-1.bin", 200_000), ("metrics.json", 0)):
            path = job_dir / "output" / rel
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(os.urandom(size) if size else b'{"loss": 0.1}')
            for p in (path, path.parent):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        write_job_credentials(job_dir, [DataSource("lab", "http://127.0.0.1:9000", "us-east-1", "AKIASTAGETEST1",
                                                   "stage-test-secret")], user="alice")
        base = SHARED_ROOT / "users" / "alice" / ("stage-test-%s" % uuid.uuid4().hex[:10])
        base.mkdir()
        os.chown(base, pw.pw_uid, pw.pw_gid)
        blocked = base / "results"
        blocked.mkdir(mode=0o755)                    # root's: alice cannot write into it yet
        dest = blocked / "run"
        res = subprocess.run(["runuser", "-u", "alice", "--", str(JOB_AIPORTAL_VENV / "bin" / "aiportal"), "stage",
                              "out", "--from", str(job_dir / "output"), "--to", str(dest)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "Permission denied" in res.stderr, res.stderr
        records = pending_stage_outs(job_dir)
        assert len(records) == 1
        with Session(live_portal.engine) as db:
            alice = db.exec(select(User).where(User.name == "alice")).one()
            db.add(Job(id=job_id, user_id=alice.id, name="stage-test", state=JobState.FAILED, partition="gpu-1card",
                       job_dir=str(job_dir), exit_code=91, ended_at=utcnow(),
                       request_json=json.dumps({"image": "/x.sif", "node_type": "1card", "command": ["true"],
                                                "output": str(dest)}),
                       stage_out_pending=json.dumps(records)))
            db.commit()
        job = PendingJob(job_id, job_dir, dest, blocked)
        made.append(job)
        return job

    yield make
    _remove_job_folders([j.id for j in made])
    for j in made:
        shutil.rmtree(j.blocked.parent, ignore_errors=True)


def _cli(live_portal, tmp_path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    token = tmp_path / "token"
    token.write_text(live_portal.tokens["alice"] + "\n")
    return subprocess.run([AIPORTAL, "--url", live_portal.url, "--token-file", str(token), *argv],
                          capture_output=True, text=True, timeout=timeout)


def _job(live_portal, job_id: str) -> Job:
    with Session(live_portal.engine, expire_on_commit=False) as db:
        return db.get(Job, job_id, populate_existing=True)


def test_stage_finish_wait_prints_the_log_and_exits_0_once_nothing_is_pending(live_portal, pending_jobs, tmp_path):
    job = pending_jobs()
    # the destination still refuses: the attempt fails and says why; nothing moved
    res = _cli(live_portal, tmp_path, "stage", "finish", job.id[:8], "--wait")
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.startswith("finishing the stage-out of job %s in Slurm job " % job.id)
    assert "Permission denied" in res.stdout                                       # the finishing job's log
    assert "finishing the stage-out of job %s failed:" % job.id in res.stderr and "Permission denied" in res.stderr
    assert (job.dir / "STAGE_OUT_PENDING.output.json").exists() and (job.dir / JOB_CREDENTIALS_NAME).exists()

    job.unblock()
    res = _cli(live_portal, tmp_path, "stage", "finish", job.id, "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    # only this attempt's lines: the failed one's were there before it started
    assert "Permission denied" not in res.stdout
    assert "[aiportal stage] out %s -> %s: 3 files: 3 copied" % (job.dir / "output", job.dest) in res.stdout, res.stdout
    assert "the stage-out of job %s finished: nothing is pending any more" % job.id in res.stderr
    for rel in ("model.bin", "ckpt/step-1.bin", "metrics.json"):
        assert (job.dest / rel).read_bytes() == (job.dir / "output" / rel).read_bytes()
    row = _job(live_portal, job.id)
    assert row.stage_out_pending is None and row.state is JobState.FAILED and row.exit_code == 91
    assert not (job.dir / JOB_CREDENTIALS_NAME).exists() and not (job.dir / "STAGE_OUT_PENDING.output.json").exists()
    log = (job.dir / "logs" / "stage-out.out").read_text()
    assert log.count("[aiportal stage] out") == 1 and "stage-test-secret" not in log
    assert (job.dir / "logs" / "stage-out.out").stat().st_uid == pwd.getpwnam("alice").pw_uid     # ran as alice
    # nothing is pending now: a 409 the CLI prints as an error
    again = _cli(live_portal, tmp_path, "stage", "finish", job.id)
    assert again.returncode == 2 and "has no pending stage-out" in again.stderr
