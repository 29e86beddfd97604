"""End to end through a running portal (gunicorn + reconciler) on the dev cluster: alice
registers a data source, submits a job over the API that reads its input from S3 and writes
outputs inside its image; the job reaches COMPLETED, its log and outputs are visible to her
(and not to bob), the outputs are in S3, and her keys appear nowhere."""
import json
import re
import time
from pathlib import Path

import pytest

from storage.s3 import S3Store
from tests.portal.conftest import api_call
from tests.storage.s3_helpers import admin_source, drop_bucket, make_bucket

pytestmark = [pytest.mark.portal, pytest.mark.slurm, pytest.mark.s3, pytest.mark.apptainer]


@pytest.fixture
def bucket(s3_credentials):
    src = admin_source(s3_credentials)
    name = make_bucket(src, "e2e")
    with S3Store(src) as s:
        s.client.put_object(Bucket=name, Key="in/numbers.txt", Body=b"1 2 3 4\n")
    yield name
    drop_bucket(src, name)


def wait_state(portal, token, job_id, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = api_call(portal, "GET", "/jobs/%s" % job_id, token)
        assert status == 200
        if job["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "UNKNOWN"):
            return job
        time.sleep(1)
    raise AssertionError("job %s still %s after %ss: %s" % (job_id, job["state"], timeout, job))


def test_submit_runs_in_the_image_and_shows_log_and_outputs(live_portal, s3_credentials, bucket, base_image,
                                                            cluster_jobs_cleanup):
    alice, bob = live_portal.tokens["alice"], live_portal.tokens["bob"]
    status, src = api_call(live_portal, "POST", "/datasources", alice, {
        "name": "lab", "endpoint": s3_credentials["endpoint"], "region": s3_credentials["region"],
        "access_key": s3_credentials["access_key"], "secret_key": s3_credentials["secret_key"], "buckets": [bucket]})
    assert status == 201, src
    program = ("import pathlib, sys; nums = pathlib.Path('/data/data/numbers.txt').read_text().split(); "
               "total = sum(map(int, nums)); print('step 1, loss = 0.5 (100.0 examples/sec; 0.1 sec/batch)'); "
               "print('sum is', total); pathlib.Path('/data/output/model').mkdir(); "
               "pathlib.Path('/data/output/model/result.txt').write_text(str(total))")
    status, job = api_call(live_portal, "POST", "/jobs", alice, {
        "image": str(base_image), "node_type": "1card", "command": ["python3", "-c", program],
        "inputs": ["s3://%s/in" % bucket], "output": "s3://%s/out" % bucket, "name": "e2e"})
    assert status == 201, job
    cluster_jobs_cleanup.append(job)
    done = wait_state(live_portal, alice, job["id"])
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0, done
    kinds = [e["kind"] for e in done["events"]]
    assert kinds[0] == "submitted" and kinds[-1] == "finished" and "state" in kinds
    status, log = api_call(live_portal, "GET", "/jobs/%s/log" % job["id"], alice)
    assert status == 200 and b"sum is 10" in log
    status, prog = api_call(live_portal, "GET", "/jobs/%s/progress" % job["id"], alice)
    assert prog["points"] == [{"step": 1, "loss": 0.5, "examples_per_sec": 100.0, "sec_per_batch": 0.1}]
    status, outs = api_call(live_portal, "GET", "/jobs/%s/outputs" % job["id"], alice)
    assert [f["path"] for f in outs["files"]] == ["model/result.txt"]
    status, body = api_call(live_portal, "GET", outs["files"][0]["url"][len("/api/v1"):], alice)
    assert status == 200 and body == b"10"
    with S3Store(admin_source(s3_credentials)) as s:
        assert s.client.get_object(Bucket=bucket, Key="out/model/result.txt")["Body"].read() == b"10"
    # bob sees none of it
    for path in ("", "/log", "/outputs", "/outputs/model/result.txt"):
        assert api_call(live_portal, "GET", "/jobs/%s%s" % (job["id"], path), bob)[0] == 404
    # the keys are nowhere: not in the script, the API's answers, the log, the database
    status, shown = api_call(live_portal, "GET", "/jobs/%s" % job["id"], alice)
    everything = json.dumps(shown) + log.decode(errors="replace") + json.dumps(src)
    with live_portal.engine.connect() as conn:
        for table in ("jobs", "events", "datasources"):
            everything += "\n".join(str(r) for r in conn.exec_driver_sql("SELECT * FROM %s" % table))
    assert s3_credentials["secret_key"] not in everything and s3_credentials["access_key"] not in everything
    # the credentials file is gone from the job folder once the job is over
    job_dir = re.search(r"^#SBATCH --chdir=(\S+)$", shown["script"], re.M).group(1)
    assert Path(job_dir, "output", "model", "result.txt").exists()
    assert not Path(job_dir, ".aiportal-credentials.json").exists()
