"""Shared-filesystem inputs on the real cluster: bound read-only at /data/data/NAME, a job with
a 5 GB input folder starts its command as soon as one with 5 MB (nothing is copied), and the
program cannot write into its input; ``stage: copy`` still copies. The inputs are folders of
the test's own under alice's shared folder, removed at the end."""
from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
import uuid

import pytest

from tests.conftest import SHARED_ROOT
from tests.portal.conftest import api_call
from tests.portal.test_e2e import wait_state

pytestmark = [pytest.mark.portal, pytest.mark.slurm]

PROBE = ("import os, sys; d = '/data/data/' + sys.argv[1]; print('files:', sorted(os.listdir(d)));\n"
         "try:\n    open(d + '/written', 'w')\nexcept OSError as e:\n    print('write refused:', e.strerror)\n"
         "else:\n    print('write allowed')")


@pytest.fixture
def inputs():
    """alice's folders: small (5 MB) and big (5 GB, allocated with fallocate: the size is on
    disk, and a copy would have to write all of it)."""
    base = SHARED_ROOT / "users" / "alice" / ("bind-test-%s" % uuid.uuid4().hex[:8])
    small, big = base / "small", base / "big"
    for d in (small, big):
        d.mkdir(parents=True)
    (small / "part-0").write_bytes(b"\0" * (5 << 20))
    subprocess.run(["fallocate", "-l", "5G", str(big / "part-0")], check=True, timeout=120)
    subprocess.run(["chown", "-R", "alice:alice", str(base)], check=True, timeout=60)
    yield small, big
    shutil.rmtree(base, ignore_errors=True)


def _stamp(line: str) -> dt.datetime:
    return dt.datetime.strptime(re.match(r"\[aiportal (\S+)\]", line).group(1), "%Y-%m-%dT%H:%M:%S")


def _run(live_portal, base_image, cleanup, folder, stage="bind"):
    """The job's log, and the seconds from the start of its run to its command's start."""
    alice = live_portal.tokens["alice"]
    status, job = api_call(live_portal, "POST", "/jobs", alice, {
        "name": "bind-%s" % folder.name, "image": str(base_image), "node_type": "1card", "time_limit": "00:05:00",
        "inputs": [str(folder)], "stage": stage, "command": ["python3", "-c", PROBE, folder.name]})
    assert status == 201, job
    cleanup.append(job)
    done = wait_state(live_portal, alice, job["id"], timeout=300)
    status, log = api_call(live_portal, "GET", "/jobs/%s/log" % job["id"], alice)
    log = log.decode()
    assert done["state"] == "COMPLETED", (done, log[-3000:])
    lines = log.splitlines()
    first = next(line for line in lines if line.startswith("[aiportal ") and " run " in line and " on " in line)
    start = next(line for line in lines if line.startswith("[aiportal ") and "] run: " in line)
    return log, (_stamp(start) - _stamp(first)).total_seconds()


def test_a_5gb_input_starts_as_fast_as_5mb_and_is_read_only(live_portal, base_image, inputs, cluster_jobs_cleanup):
    small, big = inputs
    log_small, small_s = _run(live_portal, base_image, cluster_jobs_cleanup, small)
    log_big, big_s = _run(live_portal, base_image, cluster_jobs_cleanup, big)
    for log, folder in ((log_small, small), (log_big, big)):
        assert "input: %s bound read-only at /data/data/%s" % (folder, folder.name) in log
        assert "stage in: %s" % folder not in log
        assert "files: ['part-0']" in log and "write refused: Read-only file system" in log, log[-2000:]
    # nothing copied: the command starts as soon (log stamps are whole seconds)
    assert big_s <= small_s + 2, (small_s, big_s)
    print("start of the command after the run began: 5 MB bound %.0f s, 5 GB bound %.0f s" % (small_s, big_s))


def test_stage_copy_copies_into_data(live_portal, base_image, inputs, cluster_jobs_cleanup):
    small, _ = inputs
    alice = live_portal.tokens["alice"]
    status, job = api_call(live_portal, "POST", "/jobs", alice, {
        "name": "copy-small", "image": str(base_image), "node_type": "1card", "time_limit": "00:05:00",
        "inputs": [str(small)], "stage": "copy",
        "command": ["python3", "-c", "import os; print('files:', sorted(os.listdir('/data/data')))"]})
    assert status == 201, job
    cluster_jobs_cleanup.append(job)
    done = wait_state(live_portal, alice, job["id"], timeout=300)
    status, log = api_call(live_portal, "GET", "/jobs/%s/log" % job["id"], alice)
    log = log.decode()
    assert done["state"] == "COMPLETED" and "stage in: %s -> data/" % small in log, log[-2000:]
    assert "files: ['part-0']" in log and "bound read-only" not in log
