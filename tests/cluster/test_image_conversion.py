"""Images converted on demand by Slurm jobs: three jobs asking for one new image at once get
one conversion job, wait for it (afterok) and run in the converted SIF. Before that, `aiportal
image convert` run as root: it converts as the image builder account (a definition: built by
root in a private folder, handed over by that account) and leaves nothing root-owned in the
cache, so the builder account's conversions that follow still work."""
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from containers.builder import archives_from_sif
from containers.cache import SifCache
from containers.refs import parse_image_ref
from portal.settings import Settings
from slurm.backend import SlurmCli
from slurm.states import JobState
from tests.cluster.test_execution import HOSTILE, make_request, submit_training
from tests.conftest import JOB_USER, REPO, SHARED_ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]


@pytest.fixture(scope="module")
def settings():
    return Settings.load(require_secrets=False)


@pytest.fixture(scope="module")
def user_archive(base_image, tmp_path_factory, settings):
    """A docker-archive no cache has seen (a fresh tag changes its digest), in alice's folder."""
    work = tmp_path_factory.mktemp("archive")
    image = archives_from_sif(base_image, work, name="alice/probe", tag=uuid.uuid4().hex[:12])
    pw = pwd.getpwnam(JOB_USER)
    home = SHARED_ROOT / "users" / JOB_USER / ("img-%s" % uuid.uuid4().hex[:8])
    home.mkdir(mode=0o700)
    dest = home / "probe-image.tar"
    shutil.copyfile(image.docker_archive, dest)
    for p in (home, dest):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(dest, 0o600)
    yield dest
    cache = SifCache(Path(settings.image_cache))
    digest = cache.digest_of(parse_image_ref("docker-archive:%s" % dest)).split(":", 1)[-1]
    for p in Path(settings.image_cache).rglob("*%s*" % digest):
        p.unlink()
    shutil.rmtree(home, ignore_errors=True)


AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")


def _not_the_builders(cache: Path, since: float, uid: int) -> list[str]:
    """Files of the cache another account owns: anything under apptainer/, and anything
    changed since ``since``."""
    out = []
    for p in [cache, *cache.rglob("*")]:
        st = p.lstat()
        if st.st_uid != uid and (p.is_relative_to(cache / "apptainer") or st.st_ctime >= since):
            out.append("%s (uid %d)" % (p, st.st_uid))
    return out


def _forget(cache: SifCache, ref: str) -> None:
    hexd = cache.digest_of(parse_image_ref(ref)).split(":", 1)[-1]
    for p in cache.root.rglob("*%s*" % hexd):
        p.unlink()


@pytest.fixture
def public_work():
    """A folder the builder account can read (0755), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="aiportal-root-convert-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_root_converts_as_the_builder_and_leaves_nothing_root_owned(settings, base_image, public_work):
    """The old bug: a root conversion left Apptainer's 0700 cache folders root-owned, and every
    conversion of the builder account failed after it. Also: a relative path, resolved in the
    caller's folder."""
    image = archives_from_sif(base_image, public_work / "image", name="root/probe", tag=uuid.uuid4().hex[:12])
    os.chmod(image.docker_archive, 0o644)
    cache = SifCache(Path(settings.image_cache))
    builder = pwd.getpwnam(settings.image_builder_user)
    since = time.time() - 1
    try:
        res = subprocess.run([AIPORTAL, "image", "convert", "docker-archive:image/image-docker.tar"],
                             capture_output=True, text=True, timeout=300, cwd=public_work)
        assert res.returncode == 0, res.stderr
        assert "converting as %s" % settings.image_builder_user in res.stderr
        sif = Path(res.stdout.strip())
        assert sif.is_file() and sif.stat().st_uid == builder.pw_uid
        assert _not_the_builders(cache.root, since, builder.pw_uid) == []
    finally:
        _forget(cache, "docker-archive:%s" % image.docker_archive)


def test_root_builds_a_definition_privately_and_the_builder_puts_it_in_the_cache(settings, base_image, public_work):
    marker = uuid.uuid4().hex
    (public_work / "probe.def").write_text("Bootstrap: localimage\nFrom: %s\n%%post\n    echo %s > /etc/probe\n"
                                           % (base_image, marker))
    cache = SifCache(Path(settings.image_cache))
    builder = pwd.getpwnam(settings.image_builder_user)
    since = time.time() - 1
    try:
        res = subprocess.run([AIPORTAL, "image", "convert", "probe.def"], capture_output=True, text=True,
                             timeout=300, cwd=public_work)
        assert res.returncode == 0, res.stderr
        assert "as root in /var/tmp/aiportal-def-" in res.stderr
        sif = Path(res.stdout.strip())
        assert sif == cache.path_for(cache.digest_of(parse_image_ref(str(public_work / "probe.def"))))
        assert sif.stat().st_uid == builder.pw_uid
        assert _not_the_builders(cache.root, since, builder.pw_uid) == []
        assert not list(Path("/var/tmp").glob("aiportal-def-*/image.sif"))      # the private folder is gone
        ran = subprocess.run(["runuser", "-u", JOB_USER, "--", "apptainer", "exec", str(sif), "cat", "/etc/probe"],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert ran.stdout.strip() == marker, ran.stderr
        again = subprocess.run([AIPORTAL, "image", "convert", str(public_work / "probe.def")], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and again.stdout.strip() == str(sif) and "cached" in again.stderr
    finally:
        _forget(cache, str(public_work / "probe.def"))


def test_a_definition_whose_post_fails_shows_the_failing_step(public_work, base_image):
    (public_work / "bad.def").write_text("Bootstrap: localimage\nFrom: %s\n%%post\n    echo step one\n"
                                         "    false\n" % base_image)
    res = subprocess.run([AIPORTAL, "image", "convert", "bad.def"], capture_output=True, text=True, timeout=300,
                         cwd=public_work)
    assert res.returncode == 2
    assert "+ false" in res.stderr and "step one" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].endswith("while running %post section: exit status 1")


def test_three_jobs_share_one_conversion_and_run_in_the_converted_image(settings, user_archive):
    backend = SlurmCli(timeout=30)
    out = user_archive.parent / "out"
    dump = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
            "if k.startswith('H_')}}, open('/data/output/dump-%s.json' % os.environ['AIPORTAL_JOB_ID'], 'w'))")
    reqs = [make_request("docker-archive:%s" % user_archive, node_type="1card",
                         command=("python3", "-c", dump, *HOSTILE), output=str(out), time_limit="10",
                         env=tuple(("H_%d" % i, v) for i, v in enumerate(HOSTILE)), name="conv-test")
            for _ in range(3)]
    results, errors = [], []

    def submit(req):
        try:
            results.append(submit_training(settings, backend, req)[:2])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=submit, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    deps = {spec.dependency for _, spec in results}
    assert len(deps) == 1 and deps.pop().startswith("afterok:"), [s.dependency for _, s in results]
    conversion = results[0][1].dependency.split(":")[1]
    images = {spec.image for _, spec in results}
    assert len(images) == 1
    try:
        deadline = time.monotonic() + 300
        ids = [conversion] + [j for j, _ in results]
        while True:
            sts = backend.statuses(ids)
            if len(sts) == 4 and all(s.state.terminal for s in sts.values()):
                break
            assert time.monotonic() < deadline, sts
            time.sleep(1)
    finally:
        for j, _ in results:
            backend.cancel(j)
    conv_log = (Path(settings.image_cache) / "logs" / ("convert-%s.out" % conversion)).read_text()
    assert sts[conversion].state is JobState.COMPLETED, conv_log
    assert sts[conversion].user == settings.image_builder_user
    for j, _ in results:
        assert sts[j].state is JobState.COMPLETED
    sif = Path(images.pop())
    assert sif.exists() and sif.stat().st_uid == pwd.getpwnam(settings.image_builder_user).pw_uid
    assert conv_log.count("] building ") == 1
    dumps = [json.loads(p.read_text()) for p in out.glob("dump-*.json")]
    assert len(dumps) == 3
    for d in dumps:   # an image converted from Docker evaluates $(...) unless --no-eval
        assert d["argv"] == HOSTILE and d["env"] == {"H_%d" % i: v for i, v in enumerate(HOSTILE)}
    assert not list(Path("/tmp").glob("aiportal-INJECTED-*"))
