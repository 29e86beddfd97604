"""A conversion that fails, through a running portal (gunicorn + reconciler) on the dev cluster:
alice submits two jobs on a docker-archive that is not an archive; they share one conversion
job, and when it fails both end FAILED at once, with the conversion's own error in the API's
answer and on the job page; their Slurm jobs are cancelled, not left pending."""
import html
import http.cookiejar
import os
import pwd
import re
import shutil
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from containers.cache import SifCache
from containers.refs import parse_image_ref
from portal.services.conversions import conversion_error
from portal.settings import Settings
from slurm.backend import SlurmCli
from slurm.reasons import dependency_failed
from slurm.states import JobState
from tests.conftest import JOB_USER, SHARED_ROOT
from tests.portal.conftest import PASSWORDS, api_call
from tests.portal.test_e2e import wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]


@pytest.fixture
def not_an_archive():
    """A file called .tar that is no archive (random bytes: a digest no cache has seen), in alice's folder."""
    pw = pwd.getpwnam(JOB_USER)
    folder = SHARED_ROOT / "users" / JOB_USER / ("conv-fail-%s" % uuid.uuid4().hex[:8])
    folder.mkdir(mode=0o700)
    path = folder / "broken.tar"
    path.write_bytes(os.urandom(4096))
    for p in (folder, path):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    yield path
    cache = SifCache(Path(Settings.load(require_secrets=False).image_cache))
    hexd = cache.digest_of(parse_image_ref("docker-archive:%s" % path)).split(":", 1)[1]
    for p in cache.root.rglob("*%s*" % hexd):      # its inbox copy and what the conversion left
        p.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _page(portal, path: str, user: str = "alice") -> str:
    """A page of the live portal as ``user``, logged in through the form."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    login = opener.open(portal.url + "/login", timeout=20).read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', login).group(1)
    form = urllib.parse.urlencode({"name": user, "password": PASSWORDS[user], "csrf": csrf}).encode()
    opener.open(portal.url + "/login", data=form, timeout=20).read()
    return opener.open(portal.url + path, timeout=20).read().decode()


def test_a_failed_conversion_fails_its_waiting_jobs_with_its_error(live_portal, cluster_jobs_cleanup, not_an_archive):
    alice = live_portal.tokens["alice"]
    body = {"image": "docker-archive:%s" % not_an_archive, "node_type": "1card", "command": ["true"],
            "time_limit": "5"}
    jobs = []
    for _ in range(2):
        status, job = api_call(live_portal, "POST", "/jobs", alice, body)
        assert status == 201, job
        cluster_jobs_cleanup.append(job)
        jobs.append(job)
    scripts = [api_call(live_portal, "GET", "/jobs/%s" % j["id"], alice)[1]["script"] for j in jobs]
    deps = {re.search(r"--dependency=afterok:(\d+)", s).group(1) for s in scripts}
    assert len(deps) == 1, deps                 # one conversion for both
    conversion = deps.pop()
    ended = [wait_state(live_portal, alice, j["id"], timeout=240) for j in jobs]

    settings = Settings.load(require_secrets=False)
    log = (Path(settings.image_cache) / "logs" / ("convert-%s.out" % conversion)).read_text()
    error = conversion_error(log)
    fatal = [line for line in log.splitlines() if line.startswith("aiportal: ") and "FATAL:" in line]
    assert fatal and error == fatal[-1].split("FATAL:", 1)[1].strip(), log    # apptainer's own words
    want = dependency_failed(conversion, error, "its image conversion")
    for job in ended:
        assert job["state"] == "FAILED", job
        assert job["reason"] == want
        assert job["reason_text"] == want + " [DependencyNeverSatisfied]"
        assert job["reason_category"] == "dependency"
    sts = SlurmCli().statuses([j["slurm_job_id"] for j in ended] + [conversion])
    assert sts[conversion].state is JobState.FAILED
    for job in ended:                           # cancelled, never left pending
        assert sts[job["slurm_job_id"]].state is JobState.CANCELLED
    shown = html.unescape(_page(live_portal, "/jobs/%s" % ended[0]["id"]))
    assert "Note: %s [DependencyNeverSatisfied]" % want in shown
