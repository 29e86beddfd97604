"""A throwaway registry for tests (distribution, plain HTTP on loopback, a port in 9160-9169):
htpasswd accounts for alice, bob and a site account, an access log to count what was
uploaded, and a small base image ``site/base:1`` (busybox on scratch, 2 MB) pushed by the site
account. Import the ``registry`` fixture from here (session scope: started once per run)."""
from __future__ import annotations

import contextlib
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

from tests.conftest import free_port, run, stop_process

PASSWORDS = {"alice": "alice-registry-pw", "bob": "bob-registry-pw"}
SITE = ("site", "site-pw")


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
    proc: subprocess.Popen | None = None

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


@contextlib.contextmanager
def running_registry(root: Path, ports=range(9160, 9170), push_base: bool = True):
    """A registry in ``root`` on the first free port of ``ports``, with the accounts and (with
    ``push_base``) ``site/base:1``; stopped by pid when the block ends. ``.proc`` is its process."""
    why = _missing()
    if why:
        pytest.skip(why)
    port = free_port(ports)
    accounts = dict(PASSWORDS, **{SITE[0]: SITE[1]})
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
    reg.proc = proc
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
        if push_base:
            _push_base(reg, root)
        yield reg
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def _push_base(reg: Registry, root: Path) -> None:
    """``site/base:1``: busybox on scratch (2 MB), built and pushed as root with buildah."""
    ctx = root / "base"
    ctx.mkdir()
    shutil.copy("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\n'
                                    'RUN ["/bin/busybox", "--install", "-s", "/bin"]\nENV PATH=/bin\n')
    b = ["buildah", "--storage-driver", "vfs", "--root", str(root / "bs"), "--runroot", str(root / "bsr")]
    run(b + ["bud", "--isolation", "chroot", "-t", "%s/site/base:1" % reg.host, str(ctx)], timeout=120)
    run(b + ["push", "--tls-verify=false", "--creds", "%s:%s" % SITE, "%s/site/base:1" % reg.host], timeout=120)


