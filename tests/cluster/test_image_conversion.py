"""Images converted on demand by Slurm jobs: three jobs asking for one new image at once get
one conversion job, wait for it (afterok) and run in the converted SIF."""
import json
import os
import pwd
import shutil
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
from tests.conftest import JOB_USER, SHARED_ROOT

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
