"""Registry images on the dev cluster, end to end: alice adds her account, submits a job by tag;
the portal pins the digest, a conversion job (as the builder account) pulls it with a private
authfile into a cache of this test's own, the job runs in it; the next job hits the cache."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.builds.conftest import HERE as BUILDS
from tests.portal.conftest import api_call, start_test_portal
from tests.portal.test_e2e import wait_state
from tests.registries import PASSWORDS, registry  # noqa: F401 (fixture)

pytestmark = [pytest.mark.portal, pytest.mark.slurm]


@pytest.fixture(scope="module")
def reg_portal(tmp_path_factory, registry):
    cache = Path("/srv/aiportal/shared/images/test-cache-%s" % uuid.uuid4().hex[:12])
    cache.mkdir(mode=0o755)
    b = pwd.getpwnam("aiportal-img")
    os.chown(cache, b.pw_uid, b.pw_gid)
    portal = start_test_portal(tmp_path_factory.mktemp("reg-portal"), users=(("alice", "alice", False),),
                               reconcile=True, config_lines=(
                                   'registry_insecure = ["%s"]' % registry.host,
                                   'image_cache = "%s"' % cache,
                                   'stage_bin = "%s"' % (BUILDS / "aiportal-checkout")))
    try:
        yield portal, cache
    finally:
        portal.stop()
        shutil.rmtree(cache, ignore_errors=True)


def test_a_job_by_tag_is_pinned_converted_once_and_run(reg_portal, registry):
    portal, cache = reg_portal
    token = portal.tokens["alice"]
    status, ans = api_call(portal, "POST", "/registries", token,
                           {"registry": registry.host, "username": "alice", "password": PASSWORDS["alice"]})
    assert status == 201, ans
    job = {"image": "docker://%s/site/base:1" % registry.host, "node_type": "1card", "name": "from-registry",
           "command": ["/bin/busybox", "echo", "hello from the registry"], "time_limit": "00:05:00"}
    status, first = api_call(portal, "POST", "/jobs", token, job)
    assert status == 201, first
    assert "@sha256:" in first["image"]
    done = wait_state(portal, token, first["id"], timeout=240)
    assert done["state"] == "COMPLETED", done
    status, log = api_call(portal, "GET", "/jobs/%s/log" % first["id"], token)
    assert "hello from the registry" in str(log)
    digest = first["image"].rsplit("@sha256:", 1)[1]
    sif = cache / "sha256" / ("%s.sif" % digest)
    assert sif.is_file() and sif.stat().st_uid == pwd.getpwnam("aiportal-img").pw_uid
    # the account was in a file only for the pull: gone, and never in the conversion's log
    incoming = cache / "incoming"
    assert not list(incoming.glob("auth-*.json"))
    for convert_log in (cache / "logs").glob("convert-*.out"):
        assert PASSWORDS["alice"] not in convert_log.read_text()
    # nothing under the cache is root's (conversions run as the builder account)
    root_owned = subprocess.run(["find", str(cache), "-uid", "0"], capture_output=True, text=True).stdout.split()
    assert root_owned == []
    # the second job by the same tag runs from the cache: no conversion, same digest
    status, second = api_call(portal, "POST", "/jobs", token, dict(job, name="from-cache"))
    assert status == 201 and second["image"] == first["image"]
    status, shown = api_call(portal, "GET", "/jobs/%s?script=1" % second["id"], token)
    done = wait_state(portal, token, second["id"], timeout=180)
    assert done["state"] == "COMPLETED", done
    assert "--dependency" not in (done.get("script") or "")

    # a power user's script runs the same digest: the cached SIF the portal would run
    env = dict(os.environ, AIPORTAL_URL=portal.url, AIPORTAL_TOKEN=token)
    res = subprocess.run([str(BUILDS / "aiportal-checkout"), "script", "--image", job["image"], "--node-type", "1card",
                          "--", "true"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(sif) in res.stdout
    res = subprocess.run([str(BUILDS / "aiportal-checkout"), "script", "--image", job["image"] + "-nope",
                          "--node-type", "1card", "--", "true"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "does not exist" in res.stderr


def test_a_registry_that_goes_down_before_the_pull_fails_the_job_with_the_pull_error(tmp_path_factory):
    """The registry answers when the job is submitted (the tag is pinned) and is gone when the
    conversion pulls: the conversion fails, the job ends FAILED with the conversion's own error,
    and nothing is left in the cache (no SIF, no partial file, no authfile)."""
    from tests.registries import running_registry
    cache = Path("/srv/aiportal/shared/images/test-cache-%s" % uuid.uuid4().hex[:12])
    cache.mkdir(mode=0o755)
    b = pwd.getpwnam("aiportal-img")
    os.chown(cache, b.pw_uid, b.pw_gid)
    try:
        with running_registry(tmp_path_factory.mktemp("down-registry"), ports=range(9165, 9170)) as reg:
            portal = start_test_portal(tmp_path_factory.mktemp("down-portal"), users=(("alice", "alice", False),),
                                       reconcile=True, config_lines=(
                                           'registry_insecure = ["%s"]' % reg.host, 'image_cache = "%s"' % cache,
                                           'stage_bin = "%s"' % (BUILDS / "aiportal-checkout")))
            try:
                token = portal.tokens["alice"]
                status, ans = api_call(portal, "POST", "/registries", token,
                                       {"registry": reg.host, "username": "alice", "password": PASSWORDS["alice"]})
                assert status == 201, ans
                status, job = api_call(portal, "POST", "/jobs", token, {
                    "image": "docker://%s/site/base:1" % reg.host, "node_type": "1card", "name": "reg-down",
                    "command": ["/bin/busybox", "true"], "time_limit": "00:05:00"})
                assert status == 201, job
                reg.proc.kill()            # gone before the conversion job gets to its pull
                reg.proc.wait(timeout=10)
                done = wait_state(portal, token, job["id"], timeout=180)
            finally:
                portal.stop()
    finally:
        leftovers = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()
                           and not p.match("logs/*") and not p.name.endswith((".lock", ".job")))
        shutil.rmtree(cache, ignore_errors=True)
    assert done["state"] == "FAILED", done
    assert "image conversion" in done["reason"] and "connection refused" in done["reason"].lower(), done["reason"]
    assert leftovers == [], leftovers
