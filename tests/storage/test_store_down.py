"""The store goes down in the middle of a stage-out: a private SeaweedFS (127.0.0.1:9100-9107,
its own data dir and keys) is SIGKILLed while `aiportal stage out` runs. The outputs stay in
the job directory, the command exits non-zero saying where they are, a record describes the
pending stage-out, and once the store is back the command in the record finishes the job
without sending again what had arrived."""
import json
import os
import re
import subprocess
import time

import pytest

from storage.credentials import write_job_credentials
from storage.errors import StoreUnavailableError
from storage.retry import RetryPolicy
from storage.s3 import S3Store
from storage.stage import pending_record_path, stage_in
from storage.transfer import TransferOptions
from tests.conftest import REPO
from tests.storage.s3_helpers import PrivateSeaweed, tree_digest

pytestmark = pytest.mark.s3
MiB = 1 << 20
AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")


@pytest.fixture
def weed(tmp_path):
    server = PrivateSeaweed(tmp_path / "weed")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_store_down_during_stage_out_keeps_outputs_and_a_later_stage_out_completes(weed, tmp_path):
    source = weed.source()
    with S3Store(source) as s:
        s.client.create_bucket(Bucket="outputs")
    job = tmp_path / "job"
    out = job / "output"
    (out / "ckpt").mkdir(parents=True)
    for i in range(16):
        (out / ("part-%02d.bin" % i)).write_bytes(os.urandom(4 * MiB))
    (out / "ckpt" / "model.bin").write_bytes(os.urandom(40 * MiB))
    want = tree_digest(out)
    creds = write_job_credentials(job, [source])
    uri = "s3://outputs/jobs/j1"
    argv = [AIPORTAL, "stage", "out", "--from", str(out), "--to", uri, "--credentials", str(creds),
            "--workers", "2", "--bandwidth-mbps", "400", "--retries", "3", "--progress-every", "0.5"]
    listing = S3Store(source, connect_timeout=1, read_timeout=2)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(list(listing.list("outputs", "jobs/j1/"))) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        landed = len(list(listing.list("outputs", "jobs/j1/")))
        weed.kill()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        listing.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, stderr
    assert "is unavailable after 3 attempts" in stderr
    assert "The outputs are safe in %s" % out in stderr
    record_path = pending_record_path(out)
    assert record_path == job / "STAGE_OUT_PENDING.output.json"
    assert "recorded in %s" % record_path in stderr and "finish later with: aiportal stage out" in stderr
    record = json.loads(record_path.read_text())
    assert (record["state"], record["code"], record["source"], record["destination"]) == (
        "failed", "store_unavailable", str(out), uri)
    assert source.secret_key not in stderr + stdout + record_path.read_text()
    assert tree_digest(out) == want                                  # nothing lost, nothing changed

    # stage-in while the store is down fails the same clear way
    fast = TransferOptions(retry=RetryPolicy(attempts=2, base_s=0.1))
    with pytest.raises(StoreUnavailableError, match="is unavailable"):
        stage_in(uri, str(tmp_path / "restore"), credentials={"private": source}, options=fast)

    weed.start()
    retry = record["retry"]
    assert retry[:3] == ["aiportal", "stage", "out"]
    res = subprocess.run([AIPORTAL] + retry[1:], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    copied, skipped = map(int, re.search(r"17 files: (\d+) copied .*, (\d+) already up to date", res.stderr).groups())
    assert copied + skipped == 17 and skipped >= landed, res.stderr     # what had arrived is not sent again
    assert not record_path.exists()
    stage_in(uri, str(tmp_path / "restore"), credentials={"private": source})
    assert tree_digest(tmp_path / "restore") == want
