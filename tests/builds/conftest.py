"""Fixtures for Dockerfile builds on the dev cluster: a throwaway registry (distribution, plain
HTTP on loopback, htpasswd accounts for alice and bob, an access log to count what was
uploaded) with a small base image ``site/base:1`` (busybox), and a test portal whose build jobs
run this checkout's ``aiportal`` (tests/builds/aiportal-checkout) with tight limits."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from sqlmodel import Session, select

from tests.conftest import free_port, run, stop_process

HERE = Path(__file__).resolve().parent
PASSWORDS = {"alice": "alice-registry-pw", "bob": "bob-registry-pw"}
#: the limits the test portal gives builds (small, so the hostile builds hit them fast)
STORAGE_LIMIT_MB = 64
MAX_PROCESSES = 256
TIMEOUT_S = 40


def _missing() -> str:
    for tool in ("buildah", "docker-registry", "newuidmap", "prlimit", "apptainer"):
        if shutil.which(tool) is None:
            return "%s is not installed (Debian packages buildah, docker-registry, uidmap)" % tool
    for f in ("/etc/subuid", "/etc/subgid"):
        if not re.search(r"^alice:\d+:\d+$", Path(f).read_text() if Path(f).exists() else "", re.M):
            return "alice has no range in %s (add alice:200000:65536)" % f
    return ""


@dataclass
class Registry:
    host: str              #: 127.0.0.1:PORT
    root: Path
    log: Path

    def mark(self) -> int:
        """Where the access log is now (count uploads after it)."""
        return self.log.stat().st_size

    def uploaded(self, since: int, repo: str) -> list[str]:
        """Digests of the blobs uploaded to ``repo`` after ``since`` (completed uploads: the PUT)."""
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        return re.findall(r'"PUT /v2/%s/blobs/uploads/\S*digest=sha256%%3A([0-9a-f]{64})' % re.escape(repo), text)

    def mounted(self, since: int, repo: str) -> list[str]:
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        return re.findall(r'"POST /v2/%s/blobs/uploads/\?from=\S*mount=sha256%%3A([0-9a-f]{64})\S* HTTP/1.1" 201'
                          % re.escape(repo), text)

    def blob_size(self, hexdigest: str) -> int:
        return (self.root / "data/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data").stat().st_size


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("registry")
    port = free_port(range(9160, 9170))
    accounts = dict(PASSWORDS, site="site-pw")
    (root / "htpasswd").write_text("".join("%s:%s\n" % (u, bcrypt.hashpw(p.encode(), bcrypt.gensalt(5)).decode())
                                           for u, p in accounts.items()))
    (root / "config.yml").write_text(
        "version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s/data}, delete: {enabled: true}}\n"
        "http: {addr: 127.0.0.1:%d}\nauth: {htpasswd: {realm: test, path: %s/htpasswd}}\n" % (root, port, root))
    log = root / "access.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out,
                                stderr=subprocess.STDOUT)
    reg = Registry("127.0.0.1:%d" % port, root, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen("http://%s/v2/" % reg.host, timeout=1)
            except urllib.error.HTTPError:
                break               # 401: it answers
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("docker-registry did not start:\n%s" % log.read_text())
                time.sleep(0.2)
        _push_base(reg, root)
        yield reg
    finally:
        stop_process(proc)


def _push_base(reg: Registry, root: Path) -> None:
    """``site/base:1``: busybox on scratch (2 MB), built and pushed as root with buildah."""
    ctx = root / "base"
    ctx.mkdir()
    shutil.copy("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\n'
                                    'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nENV PATH=/bin\n')
    b = ["buildah", "--storage-driver", "vfs", "--root", str(root / "bs"), "--runroot", str(root / "bsr")]
    run(b + ["bud", "--isolation", "chroot", "-t", "%s/site/base:1" % reg.host, str(ctx)], timeout=120)
    run(b + ["push", "--tls-verify=false", "--creds", "site:site-pw", "%s/site/base:1" % reg.host], timeout=120)


@dataclass
class BuildPortal:
    portal: object
    registry: Registry

    def env(self, user: str = "alice") -> dict:
        return dict(os.environ, AIPORTAL_URL=self.portal.url, AIPORTAL_TOKEN=self.portal.tokens[user])

    def cli(self, *args: str, user: str = "alice", timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(HERE / "aiportal-checkout"), *args], env=self.env(user), capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def build_portal(tmp_path_factory, registry):
    from portal.models import RegistryCredential, User
    from portal.settings import Settings
    from storage.credentials import SecretBox
    from tests.portal.conftest import start_test_portal
    portal = start_test_portal(tmp_path_factory.mktemp("build-portal"), users=(
        ("alice", "alice", False), ("bob", "bob", False), ("root-admin", "alice", True)), config_lines=(
        'registry_insecure = ["%s"]' % registry.host,
        'image_build_bin = "%s"' % (HERE / "aiportal-checkout"),
        "image_build_storage_limit_mb = %d" % STORAGE_LIMIT_MB,
        "image_build_max_processes = %d" % MAX_PROCESSES,
        "image_build_timeout_s = %d" % TIMEOUT_S))
    try:
        box = SecretBox(Settings.load(portal.config).data_key)
        with Session(portal.engine) as db:
            for name, pw in PASSWORDS.items():
                user = db.exec(select(User).where(User.name == name)).one()
                db.add(RegistryCredential(user_id=user.id, host=registry.host, username=name,
                                          password_sealed=box.seal(pw)))
            db.commit()
        yield BuildPortal(portal, registry)
    finally:
        portal.stop()
        _remove_build_folders(portal)


def _remove_build_folders(portal) -> None:
    from portal.models import ImageBuild
    with Session(portal.engine) as db:
        for b in db.exec(select(ImageBuild)):
            if b.build_dir and "/jobs/build-" in b.build_dir:
                shutil.rmtree(b.build_dir, ignore_errors=True)
    portal.engine.dispose()


def write_context(base: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    """A context folder owned by alice (the CLI runs as root here, but reads it like any client)."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "Dockerfile").write_text(dockerfile)
    for rel, text in (files or {}).items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    return base


def build_json(portal: BuildPortal, build_id: int) -> dict:
    from tests.portal.conftest import api_call
    status, ans = api_call(portal.portal, "GET", "/images/builds/%d" % build_id, portal.portal.tokens["alice"])
    assert status == 200, ans
    return ans


def last_build_id(bp: BuildPortal, user: str = "alice") -> int:
    from tests.portal.conftest import api_call
    status, ans = api_call(bp.portal, "GET", "/images/builds", bp.portal.tokens[user])
    assert status == 200, ans
    return ans["builds"][0]["id"]


def json_of(text: str) -> dict:
    return json.loads(text)
