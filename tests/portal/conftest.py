"""Fixtures for the portal: an app on a migrated in-memory database, the accounts alice, bob
(mapped to the Unix users of the dev cluster) and an admin, logged-in clients and API tokens.

The Slurm backend is the real one (``SlurmCli``) unless a test asks for ``fake_backend``,
a recorder below the adapter boundary for tests that must not touch the cluster."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlmodel import Session, select

from portal import db as dbmod
from tests.conftest import free_port as _free_port
from tests.conftest import stop_process as _stop
from portal.app import create_app
from portal.models import User
from portal.services import accounts
from portal.settings import Settings
from slurm.backend import ClusterView, SlurmBackend
from slurm.jobs import JobStatus
from slurm.states import JobState

ADMIN_TOKEN = "test-admin-token-0123456789"
PASSWORDS = {"alice": "alice-password-1", "bob": "bob-password-22", "root-admin": "admin-password-3"}
#: an image file every account can read (the portal refuses a SIF the job's user cannot read, and a
#: missing one alike): for tests whose jobs the fake backend takes and nothing runs
TEST_SIF = "/tmp/aiportal-tests/readable.sif"


@pytest.fixture(autouse=True, scope="session")
def _test_sif():
    """TEST_SIF exists, 0644 in a 0755 folder (other test runs may share it: written whole, once)."""
    path = Path(TEST_SIF)
    path.parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(path.parent, 0o755)
    if not path.is_file():
        tmp = path.with_name(".%s.%d" % (path.name, os.getpid()))
        tmp.write_bytes(b"not a real image: the fake backend never runs it\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


@pytest.fixture
def model_dir(settings):
    """The toy model (tests/inference/toy_model) in alice's folder of the test's shared root."""
    d = Path(settings.shared_root) / "users" / "alice" / "toy"
    shutil.copytree(Path(__file__).resolve().parents[1] / "inference" / "toy_model", d)
    for p in [d, *d.iterdir()]:
        shutil.chown(p, "alice", "alice")
    return str(d)


@pytest.fixture
def image(base_image):
    """The site's base image (a SIF path) as the services API takes it."""
    return str(base_image)


@dataclass
class FakeBackend(SlurmBackend):
    """Records submissions and answers from a table; for tests that must not use the cluster."""

    jobs: dict[str, JobStatus] = field(default_factory=dict)
    submitted: list[tuple[str, str]] = field(default_factory=list)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    next_id: int = 1000

    def submit(self, script, user=None):
        self.next_id += 1
        jid = str(self.next_id)
        self.submitted.append((script, user))
        comment = re.search(r"^#SBATCH --comment=(\S+)", script, re.M)
        self.jobs[jid] = JobStatus(jid, JobState.PENDING, "Priority", user=user or "",
                                   comment=comment.group(1) if comment else "")
        return jid

    def statuses(self, job_ids):
        return {j: self.jobs[j] for j in job_ids if j in self.jobs}

    def queue(self):
        return {k: v for k, v in self.jobs.items() if not v.state.terminal}

    def accounting(self, job_ids):
        return {j: self.jobs[j] for j in job_ids if j in self.jobs}

    def cancel(self, job_id, user=None):
        self.cancelled.append((job_id, user))

    def cluster(self):
        return ClusterView("aiportal", [], [])


@pytest.fixture
def settings(tmp_path):
    """Settings for the in-process app: job folders under a temporary shared root."""
    root = tmp_path / "shared"
    for user in ("alice", "bob"):
        (root / "users" / user).mkdir(parents=True)
        shutil.chown(root / "users" / user, user, user)
    (root / "datasets").mkdir()
    return Settings.from_mapping({
        "secret_key": "s" * 64, "data_key": Fernet.generate_key().decode(),
        "admin_token_sha256": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
        "database_url": "sqlite://", "shared_root": str(root)})


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory):
    """A database file migrated once per session (Alembic), copied into each test's database."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    eng = dbmod.make_engine("sqlite:///%s" % path)
    dbmod.upgrade(eng)
    eng.dispose()
    return path


@pytest.fixture(scope="session")
def password_hashes():
    # scrypt is slow on purpose: hash the test passwords once
    from werkzeug.security import generate_password_hash
    return {name: generate_password_hash(pw) for name, pw in PASSWORDS.items()}


@pytest.fixture
def engine(migrated_template):
    """A private in-memory database at the current schema."""
    import sqlite3
    eng = dbmod.make_engine("sqlite://")
    src = sqlite3.connect(migrated_template)
    raw = eng.raw_connection()
    try:
        src.backup(raw.driver_connection)
    finally:
        raw.close()
        src.close()
    yield eng
    eng.dispose()


@pytest.fixture
def users(engine, password_hashes):
    with Session(engine, expire_on_commit=False) as db:
        out = {
            "alice": accounts.add_user(db, "alice", "alice"),
            "bob": accounts.add_user(db, "bob", "bob"),
            "root-admin": accounts.add_user(db, "root-admin", "alice", admin=True),
        }
        for name, user in out.items():
            user.password_hash = password_hashes[name]
            db.add(user)
        db.commit()
    return out


@pytest.fixture
def fake_backend():
    return FakeBackend()


@pytest.fixture
def app(settings, engine, users, request):
    backend = request.getfixturevalue("fake_backend") if "fake_backend" in request.fixturenames else None
    return create_app({"TESTING": True}, settings=settings, engine=engine, backend=backend)


@pytest.fixture
def client(app):
    return app.test_client()


def csrf_of(client, path="/login") -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def login(client, name="alice", password=None):
    return client.post("/login", data={"name": name, "password": password or PASSWORDS[name],
                                       "csrf": csrf_of(client)})


@pytest.fixture
def tokens(engine, users):
    out = {}
    with Session(engine, expire_on_commit=False) as db:
        for name in ("alice", "bob", "root-admin"):
            out[name], _ = accounts.create_token(db, db.get(User, users[name].id), "test")
        db.commit()
    return out


def bearer(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


# -- a live portal: gunicorn and the reconciler as separate processes, on the real cluster --------

VENV_BIN = Path(sys.executable).parent
TEST_PORTS = range(9110, 9150)     # DESIGN.md: tests use 9100-9199 (9100-9107: a private SeaweedFS)


def free_port(ports=TEST_PORTS) -> int:
    """A free port for a test portal (9110-9149 unless given)."""
    return _free_port(ports)


@dataclass
class LivePortal:
    url: str
    config: Path
    engine: object
    tokens: dict
    procs: list
    #: where ``POST|PUT /service/NAME`` is served (the inference router)
    service_url: str = ""
    #: the environment its processes run with (AIPORTAL_CONFIG)
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.service_url = self.service_url or self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        self.engine.dispose()

    def get(self, path: str, token: str | None = None, timeout: float = 20) -> bytes:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()


def api_call(portal, method, path, token, body=None, timeout=30):
    """(status, answer) of one API call as ``token``: JSON parsed, other bodies as bytes; an
    HTTP error is an answer too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(portal.url + "/api/v1" + path, data=data, method=method,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def start_router(env: dict, port: int, log: Path) -> subprocess.Popen:
    """``aiportal router`` (the inference gateway) on 127.0.0.1:PORT, once it accepts connections."""
    import socket
    with open(log, "w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "aiportal"), "router", "--listen", "127.0.0.1:%d" % port], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise AssertionError("aiportal router did not start:\n%s" % log.read_text())
            time.sleep(0.1)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("portal exited %s:\n%s" % (proc.returncode, log.read_text()[-3000:]))
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("portal did not answer %s in %ss:\n%s" % (url, timeout, log.read_text()[-3000:]))




def write_test_config(base: Path, *lines: str) -> Path:
    """``base``/portal.toml (mode 0600): fresh secrets, the admin token ADMIN_TOKEN, a SQLite
    database in ``base``, and ``lines``."""
    config = base / "portal.toml"
    config.write_text("\n".join([
        'secret_key = "%s"' % os.urandom(32).hex(),
        'admin_token_sha256 = "%s"' % hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
        'data_key = "%s"' % Fernet.generate_key().decode(),
        'database_url = "sqlite:///%s/portal.db"' % base, *lines, ""]))
    os.chmod(config, 0o600)
    return config


def start_gunicorn(base: Path, env: dict, port: int, workers: int = 2, threads: int = 16) -> subprocess.Popen:
    """The portal's gunicorn (gthread, WORKERS x THREADS) on 127.0.0.1:PORT with ``env``'s
    settings, once ``/healthz`` answers; the app's output is appended to ``base``/portal.log
    (tracebacks of 500s), gunicorn's to ``base``/gunicorn.log. Also starts a portal again on its
    port after a test killed it."""
    log = base / "gunicorn.log"
    with open(base / "portal.log", "ab") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "--bind", "127.0.0.1:%d" % port, "--worker-class", "gthread",
             "--threads", str(threads), "--workers", str(workers), "--error-logfile", str(log),
             "portal.app:create_app()"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_http("http://127.0.0.1:%d/healthz" % port, proc, log)
    except BaseException:
        _stop(proc)
        raise
    return proc


def start_test_portal(base: Path, *, users=(("alice", "alice", False),), passwords: dict | None = None,
                      reconcile: bool = False, router: bool = False, workers: int = 2, threads: int = 16,
                      config_lines=()) -> LivePortal:
    """A portal of its own for tests and benchmarks: gunicorn (gthread, WORKERS x THREADS, as the
    portal role deploys it) on a free port of 127.0.0.1:9110-9149 with a fresh SQLite database
    in ``base``; ``users`` (name, Unix account, admin) with API tokens (and ``passwords``);
    optionally ``aiportal reconcile`` and ``aiportal router`` (its address: ``service_url``).
    The admin token is ADMIN_TOKEN. ``stop()`` stops every process by pid."""
    os.chmod(base, 0o755)
    port = free_port()
    # its own address over plain HTTP (site.toml names the installed portal's HTTPS one, whose
    # session cookie is Secure)
    config = write_test_config(base, 'reconcile_interval_s = 1.0', 'portal_url = "http://127.0.0.1:%d"' % port,
                               *config_lines)
    env = dict(os.environ, AIPORTAL_CONFIG=str(config))
    engine = dbmod.make_engine(Settings.load(config).database_url)
    dbmod.upgrade(engine)
    tokens = {}
    with Session(engine, expire_on_commit=False) as db:
        for name, unix, admin in users:
            user = accounts.add_user(db, name, unix, (passwords or {}).get(name), admin=admin)
            tokens[name], _ = accounts.create_token(db, user, "test")
        db.commit()
    portal = LivePortal("", config, engine, tokens, [], env=env)
    try:
        portal.procs.append(start_gunicorn(base, env, port, workers, threads))
        portal.url = portal.service_url = "http://127.0.0.1:%d" % port
        if reconcile:
            with open(base / "reconcile.log", "w") as rlog:
                portal.procs.append(subprocess.Popen([str(VENV_BIN / "aiportal"), "reconcile"], env=env,
                                                     stdout=rlog, stderr=subprocess.STDOUT))
        if router:
            router_port = free_port([p for p in TEST_PORTS if p != port])
            portal.procs.append(start_router(env, router_port, base / "router.log"))
            portal.service_url = "http://127.0.0.1:%d" % router_port
    except BaseException:
        portal.stop()
        raise
    return portal


def _remove_job_folders(job_ids) -> None:
    """The folders of these portal jobs (``SHARED/users/U/jobs/ID``), and nothing else: other
    test runs may have theirs beside them."""
    from tests.conftest import SHARED_ROOT
    for job_id in job_ids:
        for user in ("alice", "bob"):
            folder = SHARED_ROOT / "users" / user / "jobs" / job_id
            if job_id and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def cluster_settings(settings, engine):
    """``settings`` with the dev cluster's real shared root (jobs that really run need it);
    the folders of the jobs in the test's database are removed after it."""
    from dataclasses import replace

    from portal.models import Job
    from tests.conftest import SHARED_ROOT
    yield replace(settings, shared_root=str(SHARED_ROOT))
    with Session(engine) as db:
        _remove_job_folders([j.id for j in db.exec(select(Job))])


@pytest.fixture
def cluster_jobs_cleanup():
    """Portal jobs (the API's job objects) a test appends: their Slurm jobs are cancelled by id
    at teardown and their folders removed."""
    jobs: list[dict] = []
    yield jobs
    live = [j["slurm_job_id"] for j in jobs if j.get("slurm_job_id")]
    if live:
        subprocess.run(["scancel", *live], capture_output=True, timeout=60, check=False)
    _remove_job_folders([j["id"] for j in jobs])
