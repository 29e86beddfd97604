"""Dockerfile builds end to end on the dev cluster: the CLI packs and uploads a context, a
Slurm job runs buildah as the user, the image is pushed to a registry with the user's account
and runs under Apptainer; only new layers are sent; failures and hostile Dockerfiles end
FAILED with the reason, contained by the user, the process limit, the time-out and the
storage limit."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.builds.conftest import (MAX_PROCESSES, PASSWORDS, STORAGE_LIMIT_MB, TIMEOUT_S, build_json,
                                   last_build_id, write_context)
from tests.conftest import SHARED_ROOT

pytestmark = pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else []

SECRET = "bob-secret-%s" % uuid.uuid4().hex


def _two_line(host: str) -> str:
    return "FROM %s/site/base:1\nADD ./code/ /data/code/\n" % host


def _build(bp, ctx: Path, tag: str, *extra: str, timeout: float = 240):
    t0 = time.monotonic()
    res = bp.cli("image", "build", "-q", "-f", str(ctx / "Dockerfile"), str(ctx), "--tag", tag, *extra,
                 timeout=timeout)
    return res, time.monotonic() - t0


def test_two_line_dockerfile_builds_pushes_and_runs(build_portal, tmp_path):
    bp, host = build_portal, build_portal.registry.host
    ctx = write_context(tmp_path / "ctx", _two_line(host), {"code/hello.txt": "hello from the build\n",
                                                            "code/big.tmp": "left out\n", ".dockerignore": "code/*.tmp\n"})
    res, took = _build(bp, ctx, "%s/alice/app:1" % host)
    assert res.returncode == 0, res.stdout + res.stderr
    pinned = res.stdout.strip().splitlines()[-1]
    assert pinned.startswith("%s/alice/app@sha256:" % host), res.stdout
    assert "STEP 2/2: ADD ./code/ /data/code/" in res.stdout       # the log was streamed
    print("two-line build+push end to end: %.1f s" % took)
    build = build_json(bp, last_build_id(bp))
    assert build["state"] == "PUSHED" and build["pinned"] == pinned
    assert not Path(build_dir(bp, build["id"]), "auth.json").exists()      # the runner removed the credentials
    listed = bp.cli("image", "builds")
    assert listed.returncode == 0 and "PUSHED" in listed.stdout and "%s/alice/app:1" % host in listed.stdout
    assert bp.cli("image", "builds", user="bob").stdout.count("\n") == 1       # the header only
    log = bp.portal.get("/api/v1/images/builds/%d/log?offset=0" % build["id"], bp.portal.tokens["alice"]).decode()
    assert "pushed %s" % pinned in log
    # the pushed image runs under apptainer (pulled with alice's account)
    sif = tmp_path / "app.sif"
    env = dict(os.environ, APPTAINER_DOCKER_USERNAME="alice", APPTAINER_DOCKER_PASSWORD=PASSWORDS["alice"])
    pull = subprocess.run(["apptainer", "pull", "--no-https", str(sif), "docker://" + pinned], env=env,
                          capture_output=True, text=True, timeout=180)
    assert pull.returncode == 0, pull.stderr
    out = subprocess.run(["apptainer", "exec", str(sif), "/bin/sh", "-c", "cat /data/code/hello.txt; ls /data/code"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == ["hello from the build", "hello.txt"], out.stdout + out.stderr


def build_dir(bp, build_id: int) -> str:
    from portal.models import ImageBuild
    from sqlmodel import Session
    with Session(bp.portal.engine) as db:
        return db.get(ImageBuild, build_id).build_dir


def test_second_build_sends_only_the_new_layer(build_portal, tmp_path):
    bp, reg = build_portal, build_portal.registry
    base_layers = set()
    for i, text in enumerate(("first version\n", "second version, a little longer\n")):
        ctx = write_context(tmp_path / ("ctx%d" % i), _two_line(reg.host), {"code/main.py": text * 100})
        mark = reg.mark()
        res, took = _build(bp, ctx, "%s/alice/layers:%d" % (reg.host, i))
        assert res.returncode == 0, res.stdout + res.stderr
        uploaded, mounted = reg.uploaded(mark, "alice/layers"), reg.mounted(mark, "alice/layers")
        sizes = {d: reg.blob_size(d) for d in uploaded}
        print("build %d: %.1f s; uploaded %d blobs, %d bytes %s; mounted %s"
              % (i, took, len(uploaded), sum(sizes.values()), sizes, mounted))
        if i == 0:
            base_layers = set(mounted)
            assert base_layers, "the base layer was not mounted from site/base"
        else:
            # only the new layer and the image config went up: the base layer is already in the repository
            assert len(uploaded) == 2 and not (set(uploaded) & base_layers), (uploaded, base_layers)
            assert sum(sizes.values()) < 8192, sizes
            assert reg.blob_size(next(iter(base_layers))) > 500_000      # what was not sent


def test_failing_run_step_fails_with_the_error(build_portal, tmp_path):
    bp, host = build_portal, build_portal.registry.host
    ctx = write_context(tmp_path / "ctx", "FROM %s/site/base:1\nRUN echo 'compiling'; echo 'error: widget.c: no such widget' >&2; exit 3\n" % host)
    res, _ = _build(bp, ctx, "%s/alice/broken:1" % host)
    assert res.returncode == 1, res.stdout + res.stderr
    build = build_json(bp, last_build_id(bp))
    assert build["state"] == "FAILED"
    assert "no such widget" in build["message"] and "exit status 3" in build["message"], build["message"]
    assert "FAILED" in res.stderr and "no such widget" in res.stderr


def test_tag_on_a_registry_without_an_account_is_refused(build_portal, tmp_path):
    bp = build_portal
    ctx = write_context(tmp_path / "ctx", "FROM scratch\n")
    res, _ = _build(bp, ctx, "registry.example.org:5000/alice/x:1")
    assert res.returncode == 2
    assert "add your account for registry.example.org:5000 first: aiportal registry login" in res.stderr


@pytest.fixture
def bob_secret():
    bob = pwd.getpwnam("bob")
    d = SHARED_ROOT / "users" / "bob" / "jobs" / ("secret-%s" % uuid.uuid4().hex[:8])
    d.mkdir(mode=0o700, parents=True)
    os.chown(d, bob.pw_uid, bob.pw_gid)
    (d / "secret.txt").write_text(SECRET + "\n")
    os.chown(d / "secret.txt", bob.pw_uid, bob.pw_gid)
    os.chmod(d / "secret.txt", 0o600)
    yield d / "secret.txt"
    shutil.rmtree(d, ignore_errors=True)


def test_run_cannot_read_another_users_files(build_portal, tmp_path, bob_secret):
    bp, host = build_portal, build_portal.registry.host
    p = str(bob_secret)
    run = ("cat %s; for d in /proc/[0-9]*; do cat $d/root%s $d/cwd/secret.txt; done; "
           "find / -name secret.txt; echo searched" % (p, p))
    ctx = write_context(tmp_path / "ctx", "FROM %s/site/base:1\nRUN %s 2>/dev/null; true\n" % (host, run))
    res, _ = _build(bp, ctx, "%s/alice/peek:1" % host)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "searched" in res.stdout and SECRET not in res.stdout


def test_run_cannot_write_outside_the_build(build_portal, tmp_path):
    bp, host = build_portal, build_portal.registry.host
    name = "pwned-%s" % uuid.uuid4().hex[:8]
    targets = ["/tmp/" + name, "/etc/" + name, str(SHARED_ROOT / "users" / "bob" / name),
               str(SHARED_ROOT / "images" / name)]
    run = " ".join("echo x > %s; for d in /proc/[0-9]*; do echo x > $d/root%s; done;" % (t, t) for t in targets)
    ctx = write_context(tmp_path / "ctx", "FROM %s/site/base:1\nRUN (%s) 2>/dev/null; echo tried\n" % (host, run))
    res, _ = _build(bp, ctx, "%s/alice/escape:1" % host)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "tried" in res.stdout
    assert [t for t in targets if os.path.exists(t)] == []


def _alice_build_processes() -> list[str]:
    """Processes left of alice's builds: buildah, or anything running as her subordinate ids."""
    out = subprocess.run(["ps", "-eo", "pid,uid,comm", "--no-headers"], capture_output=True, text=True).stdout
    left = []
    for line in out.splitlines():
        pid, uid, comm = line.split(None, 2)
        if (int(uid) == pwd.getpwnam("alice").pw_uid and comm in ("buildah", "sh", "busybox")) or \
                100000 <= int(uid) < 100000 + 65536:
            left.append(line)
    return left


def test_fork_bomb_is_bounded_and_stopped(build_portal, tmp_path):
    bp, host = build_portal, build_portal.registry.host
    ctx = write_context(tmp_path / "ctx", "FROM %s/site/base:1\nRUN bomb() { bomb | bomb & }; bomb; sleep 600\n" % host)
    t0 = time.monotonic()
    res, _ = _build(bp, ctx, "%s/alice/bomb:1" % host, timeout=TIMEOUT_S + 120)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stdout + res.stderr
    build = build_json(bp, last_build_id(bp))
    # stopped either by the build's time-out, or sooner when the step's shell (or buildah, whose
    # processes count against the same limit) could not fork any more and gave up (exit status 2):
    # which one comes first is up to the scheduler
    assert build["state"] == "FAILED" and ("time-out" in build["message"] or "exit status 2" in build["message"]), \
        build["message"]
    assert took < TIMEOUT_S + 60
    assert "can't fork" in res.stdout or "Resource temporarily unavailable" in res.stdout or \
        "exit status 2" in build["message"], res.stdout[-2000:]
    time.sleep(1)
    assert _alice_build_processes() == []
    # the node still serves alice: a fresh process starts
    assert subprocess.run(["runuser", "-u", "alice", "--", "true"], timeout=30).returncode == 0
    print("fork bomb stopped after %.1f s (limit %d processes)" % (took, MAX_PROCESSES))


def test_filling_the_disk_fails_clearly_and_cleans_the_storage(build_portal, tmp_path):
    bp, host = build_portal, build_portal.registry.host
    fill = "i=0; while [ $i -lt 200 ]; do dd if=/dev/zero of=/fill$i bs=1M count=8 2>/dev/null; i=$((i+1)); sleep 0.1; done"
    ctx = write_context(tmp_path / "ctx", "FROM %s/site/base:1\nRUN %s\n" % (host, fill))
    res, _ = _build(bp, ctx, "%s/alice/fill:1" % host)
    assert res.returncode == 1, res.stdout + res.stderr
    build = build_json(bp, last_build_id(bp))
    assert build["state"] == "FAILED"
    assert "over the limit of %d MB" % STORAGE_LIMIT_MB in build["message"], build["message"]
    storage = Path("/var/tmp/aiportal-build-alice")
    used = subprocess.run(["du", "-s", "-B1", str(storage)], capture_output=True, text=True).stdout.split()
    assert int(used[0]) < 4 << 20, used
    # one big file: RLIMIT_FSIZE stops it at once
    ctx = write_context(tmp_path / "ctx2", "FROM %s/site/base:1\nRUN dd if=/dev/zero of=/big bs=1M count=%d\n"
                        % (host, STORAGE_LIMIT_MB * 2))
    res, _ = _build(bp, ctx, "%s/alice/fill:2" % host)
    assert res.returncode == 1
    assert build_json(bp, last_build_id(bp))["state"] == "FAILED"
