"""Shared fixtures. Integration tests run against the dev cluster that `make test` provisions
(ansible/inventories/dev): Slurm on 127.0.0.1, SeaweedFS on :9000, sshd on :2222, the portal
on :8000. Paths and secrets are read from where the Ansible roles put them."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ETC = Path("/etc/aiportal")
SHARED_ROOT = Path("/srv/aiportal/shared")
JOB_USER = "alice"


def run(argv, **kw):
    """Run argv (never a shell), check the exit code and return stdout."""
    kw.setdefault("timeout", 60)
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s"
                             % (argv, res.returncode, res.stdout, res.stderr))
    return res.stdout


@dataclass
class Job:
    id: str
    output: Path


class SlurmSession:
    """Submits test jobs as a Unix user and cancels whatever is left at teardown (by job id)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ids: list[str] = []

    def sbatch(self, script: str, *options: str, user: str = JOB_USER) -> Job:
        out = self.workdir / ("job-%s.out" % uuid.uuid4().hex[:8])
        argv = ["runuser", "-u", user, "--", "sbatch", "--parsable", "--output", str(out),
                "--chdir", str(self.workdir), *options]
        jid = run(argv, input=script).strip().split(";")[0]
        self.ids.append(jid)
        return Job(jid, out)

    def state(self, job: Job) -> str:
        """Live state from squeue, else the final state from sacct ('' while unknown)."""
        live = run(["squeue", "-h", "-j", job.id, "-o", "%T"], timeout=15).strip()
        if live:
            return live
        return run(["sacct", "-n", "-X", "-P", "-j", job.id, "-o", "State"], timeout=15).strip()

    def wait(self, job: Job, timeout: float = 90) -> str:
        """Wait until the job has ended; returns its final state (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job)
            if state and state.split()[0] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                              "OUT_OF_MEMORY", "NODE_FAIL"}:
                return state.split()[0]
            time.sleep(0.5)
        raise AssertionError("job %s still %r after %ss" % (job.id, state, timeout))

    def wait_state(self, job: Job, want: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(job) == want:
                return
            time.sleep(0.3)
        raise AssertionError("job %s is %r, not %s, after %ss" % (job.id, self.state(job), want, timeout))

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=30)


@pytest.fixture
def job_dir():
    """A fresh directory on the shared filesystem owned by the job user; removed afterwards."""
    pw = pwd.getpwnam(JOB_USER)
    d = SHARED_ROOT / "users" / JOB_USER / ("test-%s" % uuid.uuid4().hex[:10])
    d.mkdir(mode=0o700)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def slurm(job_dir):
    session = SlurmSession(job_dir)
    yield session
    session.cancel_all()


@pytest.fixture(scope="session")
def s3_credentials():
    return json.loads((ETC / "s3-admin.json").read_text())


@pytest.fixture(scope="session")
def admin_token():
    return (ETC / "secrets" / "admin_token").read_text().strip()
