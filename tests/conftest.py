"""Shared fixtures. Integration tests run against the dev cluster that `make test` provisions
(ansible/inventories/dev): Slurm on 127.0.0.1, SeaweedFS on :9000, sshd on :2222, the portal
on https://127.0.0.1:8443. Paths and secrets are read from where the Ansible roles put them."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
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
# aiportal as jobs and job users see it: installed from this checkout, readable by everyone
# (the checkout itself may sit where other users cannot look, e.g. under /root)
JOB_AIPORTAL_VENV = Path("/opt/aiportal/venv")


def free_port(ports) -> int:
    """The first port of ``ports`` nothing listens on (DESIGN.md: tests' own servers use 9100-9199)."""
    import socket
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in %s-%s" % (ports[0], ports[-1]))


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM a process a test or bench started (by its Popen, so by pid), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
        jid = run(argv, input=script, cwd=self.workdir).strip().split(";")[0]
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


DEFINITION = REPO / "containers" / "definitions" / "debian-python.def"


def _drop_caps_env():
    """Root in this sandbox may lack CAP_SYS_RESOURCE; apptainer's %post then needs it dropped."""
    env = dict(os.environ)
    status = Path("/proc/self/status").read_text().splitlines()
    bnd = int(next(line.split()[1] for line in status if line.startswith("CapBnd")), 16)
    if not (bnd >> 24) & 1:
        env["APPTAINER_DROP_CAPS"] = "CAP_SYS_RESOURCE"
    return env


@pytest.fixture(scope="session")
def base_image():
    """Build once per definition digest into the shared image folder (later runs reuse it)."""
    digest = hashlib.sha256(DEFINITION.read_bytes()).hexdigest()[:16]
    out_dir = SHARED_ROOT / "images" / "base"
    out_dir.mkdir(parents=True, exist_ok=True)
    sif = out_dir / ("debian-python-%s.sif" % digest)
    if not sif.exists():
        tmp = sif.with_suffix(".sif.part")
        res = subprocess.run(["apptainer", "build", "--force", "--mksquashfs-args",
                              "-comp zstd -Xcompression-level 3", str(tmp), str(DEFINITION)],
                             capture_output=True, text=True, timeout=600, env=_drop_caps_env())
        assert res.returncode == 0, "apptainer build failed:\n%s\n%s" % (res.stdout[-3000:], res.stderr[-3000:])
        tmp.chmod(0o644)
        tmp.rename(sif)
    return sif


@pytest.fixture(scope="session")
def live_portal(tmp_path_factory):
    """A portal with ``aiportal reconcile`` and ``aiportal router``
    (``tests.portal.conftest.start_test_portal``) on the dev cluster's Slurm, shared filesystem
    and log sshd, one per run for every package's tests; accounts alice, bob and an admin with
    API tokens and passwords. Its processes are stopped by pid at the end."""
    from tests.portal.conftest import PASSWORDS, start_test_portal
    portal = start_test_portal(tmp_path_factory.mktemp("live-portal"), users=(
        ("alice", "alice", False), ("bob", "bob", False), ("root-admin", "alice", True)), passwords=PASSWORDS,
        reconcile=True, router=True,
        # every test calls from 127.0.0.1, and the OpenAPI fuzz probes each operation it got an
        # answer from with a wrong token (schemathesis' ignored_auth): the default limit of wrong
        # tokens per address would refuse the rest of the run (tests/portal/test_sessions.py holds it)
        config_lines=("token_failures_per_address = 1000000",))
    try:
        yield portal
    finally:
        portal.stop()
