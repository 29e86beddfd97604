"""Fixtures for Dockerfile builds on the dev cluster: a throwaway registry (distribution, plain
HTTP on loopback, htpasswd accounts for alice and bob, an access log to count what was
uploaded) with a small base image ``site/base:1`` (busybox), and a test portal whose build jobs
run this checkout's ``aiportal`` (tests/builds/aiportal-checkout) with tight limits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlmodel import Session, select

from tests.registries import PASSWORDS, Registry, registry  # noqa: F401 (the session's throwaway registry)

HERE = Path(__file__).resolve().parent
#: the limits the test portal gives builds (small, so the hostile builds hit them fast)
STORAGE_LIMIT_MB = 64
MAX_PROCESSES = 256
TIMEOUT_S = 40


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
