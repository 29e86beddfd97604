"""Fixtures for the health and recovery tests: a migrated SQLite file database with accounts
alice and bob, a loopback webhook receiver, and helpers for the dev cluster's nodes."""
from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from monitor.ownership import owned_by_aiportal
from tests.conftest import free_port as _free_port
from tests.conftest import stop_process as _stop
from sqlmodel import Session

from portal import db as dbmod
from portal.services import accounts

#: DESIGN.md: second instances in tests use 9100-9199; the live portal takes 9110-9149
RECEIVER_PORTS = range(9150, 9200)


def free_port(ports=RECEIVER_PORTS) -> int:
    return _free_port(ports)


@pytest.fixture
def db_engine(tmp_path):
    """A file database (shared by threads and processes) at the current schema."""
    eng = dbmod.make_engine("sqlite:///%s/portal.db" % tmp_path)
    dbmod.upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def owners(db_engine):
    with Session(db_engine, expire_on_commit=False) as db:
        out = {"alice": accounts.add_user(db, "alice", "alice"), "bob": accounts.add_user(db, "bob", "bob")}
        out["alice"].email = "alice@example.org"
        db.add(out["alice"])
        db.commit()
    return out


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every POST; answers 500 to the first ``fail``."""

    url: str = ""
    posts: list = field(default_factory=list)
    attempts: int = 0
    fail: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[dict]:
        with self.lock:
            return [json.loads(b) for _, b in self.posts]

    def wait_for(self, pred, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.bodies()
            if pred(got):
                return got
            time.sleep(0.2)
        raise AssertionError("webhook receiver: condition not met in %ss; got %s" % (timeout, self.bodies()))


@pytest.fixture
def receiver():
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):          # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.attempts += 1
                failing = rec.attempts <= rec.fail
                if not failing:
                    rec.posts.append((dict(self.headers), body))
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    rec.url = "http://127.0.0.1:%d/hook" % server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def sinfo_node(name: str) -> tuple[str, str]:
    """(state, reason) of a node as sinfo prints them."""
    out = subprocess.run(["sinfo", "-h", "-N", "-n", name, "-o", "%T|%E"], capture_output=True, text=True,
                         timeout=15, check=True).stdout.splitlines()[0]
    state, _, reason = out.partition("|")
    return state.strip(), "" if reason.strip() == "none" else reason.strip()


def wait_node(name: str, pred, timeout: float, step: float = 0.5) -> tuple[str, str, float]:
    """Poll sinfo until ``pred(state, reason)``; returns (state, reason, seconds waited)."""
    t0 = time.monotonic()
    state = reason = ""
    while time.monotonic() - t0 < timeout:
        state, reason = sinfo_node(name)
        if pred(state, reason):
            return state, reason, time.monotonic() - t0
        time.sleep(step)
    raise AssertionError("node %s is %s (%r), condition not met after %ss" % (name, state, reason, timeout))


# -- the live side: `aiportal monitor` processes on a test database, nodes of the dev cluster ----

import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


from portal.settings import Settings  # noqa: E402
from tests.portal.conftest import write_test_config  # noqa: E402

VENV_BIN = Path(sys.executable).parent
AIPORTAL = str(VENV_BIN / "aiportal")


def aiportal(*args, env=None, timeout=60, check=True):
    res = subprocess.run([AIPORTAL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError("aiportal %s exited %d: %s %s" % (" ".join(args), res.returncode, res.stdout, res.stderr))
    return res


def site_settings() -> Settings:
    return Settings.load(require_secrets=False)


def health_interval() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15).stdout
    for line in out.splitlines():
        if line.startswith("HealthCheckInterval"):
            return int(line.split("=")[1].split()[0])
    raise AssertionError("no HealthCheckInterval in `scontrol show config`: run `make provision`")


def idle_node(candidates) -> str:
    """A node of ``candidates`` that is idle (no jobs of other tests or engineers on it)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for name in candidates:
            state, reason = sinfo_node(name)
            if state == "idle" and not reason:
                return name
        time.sleep(2)
    raise AssertionError("none of %s became idle within 180 s" % (candidates,))


def heal_node(name: str) -> None:
    """Undo every injected fault and any aiportal drain left on ``name`` (finalizers)."""
    aiportal("dev", "fail-node", name, "--heal", check=False)
    state, reason = sinfo_node(name)
    if owned_by_aiportal(reason) or reason.startswith("aiportal-test"):
        subprocess.run(["scontrol", "update", "nodename=%s" % name, "state=resume"], capture_output=True, timeout=15)


@dataclass
class LiveMonitor:
    config: Path
    settings: Settings
    engine: object
    procs: list
    logs: list




@pytest.fixture
def live_monitor(tmp_path, receiver):
    """Two `aiportal monitor` processes (to show a row is never notified twice) and one
    reconciler on a fresh database, with the webhook receiver configured; stopped by pid."""
    os.chmod(tmp_path, 0o755)
    config = write_test_config(tmp_path, 'reconcile_interval_s = 1.0', 'monitor_interval_s = 1.0',
                               'notify_webhook_url = "%s"' % receiver.url, 'notify_webhook_secret = "test-secret"',
                               'notify_backoff_s = 1.0')
    settings = Settings.load(config)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.upgrade(engine)
    env = dict(os.environ, AIPORTAL_CONFIG=str(config))
    procs, logs = [], []
    try:
        for name in ("monitor-a", "monitor-b", "reconcile"):
            log = tmp_path / ("%s.log" % name)
            logs.append(log)
            with open(log, "w") as fh:
                procs.append(subprocess.Popen([AIPORTAL, name.split("-")[0]], env=env, stdout=fh,
                                              stderr=subprocess.STDOUT))
        yield LiveMonitor(config, settings, engine, procs, logs)
    finally:
        for p in procs:
            _stop(p)
        engine.dispose()


@pytest.fixture
def alice_dirs():
    """A folder in alice's space (outputs go there); removed afterwards. Job folders a test
    makes elsewhere it appends to ``alice_dirs.cleanup`` (only those are removed: other tests
    running at the same time have theirs beside them)."""
    import pwd

    class Root(type(Path())):
        cleanup: list

    pw = pwd.getpwnam("alice")
    root = Root("/srv/aiportal/shared/users/alice") / ("health-%s" % os.urandom(4).hex())
    root.cleanup = []
    root.mkdir(mode=0o700)
    os.chown(root, pw.pw_uid, pw.pw_gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    for p in root.cleanup:
        shutil.rmtree(p, ignore_errors=True)
