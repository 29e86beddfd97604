"""Fault: the S3 store goes down while a job stages its outputs out; finished later from the API.

A portal job (alice, through the live test portal and its reconciler) writes outputs bound for
``s3://BUCKET/out`` on a **private** SeaweedFS this test starts on ports of its own (the shared
store on :9000 is never touched). The test SIGKILLs the store once the outputs are written and
before the job's stage-out starts; the stage-out fails after its retries, the job ends FAILED
with exit 91 (what Slurm says, and what the portal shows) and ``stage_out_pending``, its outputs
and its credentials file kept in its folder. The store is started again (same data, same
keys), ``POST /api/v1/jobs/ID/stage-out`` runs ``aiportal stage out`` as alice in a Slurm job,
and the reconciler notices it ended: every object's sha256 matches its file,
``stage_out_pending`` is null, the credentials file and the pending record are gone, and the
timeline says what happened.

Counts: sent/accepted: the job submission; ran: runs of its program (its "outputs written"
line in the log); completed: jobs whose outputs all arrived intact after the finish; lost:
accepted jobs whose outputs did not; duplicated: extra runs of the program, or of the finishing
job; misreported: an answer of the portal that disagrees with Slurm's accounting or with the
store and the job folder (a pending stage-out shown as none, or the reverse; a state or exit
code Slurm did not give)."""
from __future__ import annotations

import datetime as dt
import hashlib
import socket
import time
import uuid
from pathlib import Path

import pytest

from storage.credentials import JOB_CREDENTIALS_NAME
from storage.s3 import S3Store
from tests.faults.conftest import Counts, slurm_runs
from tests.portal.conftest import api_call, cluster_jobs_cleanup  # noqa: F401 (fixture)
from tests.storage.s3_helpers import PrivateSeaweed

pytestmark = [pytest.mark.portal, pytest.mark.slurm, pytest.mark.s3, pytest.mark.apptainer]

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "UNKNOWN")
# writes the outputs, says so, then waits (up to 2 minutes) for the test's go-ahead in data/go
PROGRAM = ("import os, pathlib, time; out = pathlib.Path('/data/output'); (out / 'ckpt').mkdir(); "
           "[(out / ('part-%d.bin' % i)).write_bytes(os.urandom(3 << 20)) for i in range(4)]; "
           "(out / 'ckpt' / 'model.bin').write_bytes(os.urandom(5 << 20)); "
           "(out / 'metrics.json').write_text('{\"loss\": 0.25}'); print('outputs written', flush=True); "
           "go = pathlib.Path('/data/data/go'); deadline = time.time() + 120; "
           "[time.sleep(0.2) for _ in iter(lambda: go.exists() or time.time() > deadline, True)]; "
           "print('done', flush=True)")


class FaultStore(PrivateSeaweed):
    """A private SeaweedFS on 8 free loopback ports: 9100-9109 first (the private stores' own),
    then down from 9199, so that a test_store_down running beside it does not collide. Its
    ports stay the same across kill() and start()."""

    NAMES = ("s3", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")

    def __init__(self, workdir: Path):
        ports = [p for p in [*range(9100, 9110), *range(9199, 9149, -1)] if _free(p)][:len(self.NAMES)]
        assert len(ports) == len(self.NAMES), "not enough free ports in 9100-9109 and 9150-9199"
        self.PORTS = dict(zip(self.NAMES, ports))
        super().__init__(workdir)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def store(tmp_path):
    server = FaultStore(tmp_path / "weed")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _wait(what: str, check, timeout: float, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("waited %.0f s for %s" % (timeout, what))
        time.sleep(interval)


def test_store_down_during_stage_out_then_finish_from_the_api(live_portal, store, base_image, cluster_jobs_cleanup):
    alice = live_portal.tokens["alice"]
    counts = Counts()
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    source = store.source("faults")
    bucket = "faults-%s" % uuid.uuid4().hex[:10]
    with S3Store(source) as s:
        s.client.create_bucket(Bucket=bucket)
    name = "faults-%s" % uuid.uuid4().hex[:8]
    status, src = api_call(live_portal, "POST", "/datasources", alice, {
        "name": name, "endpoint": source.endpoint, "region": source.region, "access_key": source.access_key,
        "secret_key": source.secret_key, "buckets": [bucket]})
    assert status == 201, src
    try:
        out_uri = "s3://%s/out" % bucket
        counts.sent += 1
        status, job = api_call(live_portal, "POST", "/jobs", alice, {
            "image": str(base_image), "node_type": "1card", "command": ["python3", "-c", PROGRAM],
            "output": out_uri, "name": "store-down", "time_limit": "10"})
        assert status == 201, job
        counts.accepted += 1
        cluster_jobs_cleanup.append(job)
        job_id = job["id"]

        def log() -> str:
            st, text = api_call(live_portal, "GET", "/jobs/%s/log" % job_id, alice)
            return text.decode(errors="replace") if st == 200 and isinstance(text, bytes) else ""

        def written(text: str) -> int:         # the program's own line (the script's "run:" line quotes it too)
            return sum(line.strip() == "outputs written" for line in text.splitlines())

        _wait("the job's outputs", lambda: written(log()), 240)
        shown = api_call(live_portal, "GET", "/jobs/%s" % job_id, alice)[1]
        job_dir = Path(next(line.split("=", 1)[1] for line in shown["script"].splitlines()
                            if line.startswith("#SBATCH --chdir=")))
        creds = job_dir / JOB_CREDENTIALS_NAME
        record = job_dir / "STAGE_OUT_PENDING.output.json"
        want = _files(job_dir / "output")
        assert len(want) == 6

        # the fault: the store goes down before the stage-out starts
        store.kill()
        (job_dir / "data" / "go").write_text("go")
        ended = _wait("the job's end", lambda: (lambda j: j if j["state"] in TERMINAL else None)(
            api_call(live_portal, "GET", "/jobs/%s" % job_id, alice)[1]), 300)
        if not ended.get("stage_out_pending"):
            counts.misreported += 1
        text = log()
        counts.ran = written(text)
        runs = slurm_runs("alice", since).get(job_id, [])
        acct = runs[-1].state.value if runs else "?"
        # what Slurm says, and what the portal shows: the command succeeded, the stage-out did not
        if (ended["state"], ended["exit_code"]) != ("FAILED", 91) or acct != "FAILED":
            counts.misreported += 1
        assert "stage out failed; outputs are kept" in text, text[-3000:]
        assert "is unavailable after" in text and source.secret_key not in text
        [pending] = ended["stage_out_pending"]
        assert (pending["destination"], pending["state"], pending["code"]) == (out_uri, "failed", "store_unavailable")
        if not (record.exists() and creds.exists()):
            counts.misreported += 1
        assert _files(job_dir / "output") == want                        # nothing lost, nothing changed

        # the store comes back; the user finishes the stage-out from the API
        store.start()
        status, asked = api_call(live_portal, "POST", "/jobs/%s/stage-out" % job_id, alice)
        assert status == 202, asked
        finish = asked["stage_out_finish"]
        assert finish["state"] == "running" and finish["slurm_job_id"] and finish["requested_by"] == "alice"
        assert api_call(live_portal, "POST", "/jobs/%s/stage-out" % job_id, alice)[0] == 409     # not twice
        assert api_call(live_portal, "POST", "/jobs/%s/stage-out" % job_id, live_portal.tokens["bob"])[0] == 404
        done = _wait("the finished stage-out", lambda: (lambda j: j if not j.get("stage_out_pending") or (
            j.get("stage_out_finish") or {}).get("state") == "failed" else None)(
            api_call(live_portal, "GET", "/jobs/%s" % job_id, alice)[1]), 300)
        assert done["stage_out_pending"] is None, done.get("stage_out_finish")

        # every object is there, byte for byte; nothing else is
        with S3Store(source) as s:
            keys = sorted(o.key for o in s.list(bucket, "out/"))
            got = {k[len("out/"):]: _sha256(s.client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys}
        intact = got == want
        if intact:
            counts.completed += 1
        else:
            counts.lost += 1
            counts.misreported += 1                                       # shown as done, but it is not
        assert intact, {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        if creds.exists() or record.exists():
            counts.misreported += 1
        assert not creds.exists() and not record.exists()
        assert (done["state"], done["exit_code"]) == ("FAILED", 91)          # Slurm's word on the run stays

        finishes = [r for r in slurm_runs("alice", since).get("stage-out", []) if r.slurm_id == finish["slurm_job_id"]]
        assert [r.state.value for r in finishes] == ["COMPLETED"]
        events = [e["message"] for e in done["events"] if e["kind"] == "stage_out"]
        assert events[0].startswith("finish stage-out requested by alice: Slurm job %s" % finish["slurm_job_id"])
        assert events[-1] == ("stage-out finished: the outputs are at %s; the credentials file was removed" % out_uri)
        counts.duplicated = max(0, counts.ran - 1) + max(0, sum(m.startswith("finish stage-out requested")
                                                                 for m in events) - 1)
        status, flog = api_call(live_portal, "GET", "/jobs/%s/stage-out/log" % job_id, alice)
        flog = flog.decode(errors="replace")
        assert status == 200 and "[aiportal stage] out %s -> %s: 6 files:" % (job_dir / "output", out_uri) in flog, flog
        assert source.secret_key not in flog and source.access_key not in flog
        assert len(runs) == 1 and runs[0].started
    finally:
        api_call(live_portal, "DELETE", "/datasources/%s" % name, alice)
    print(counts.line())
    assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0), counts.line()
    assert (counts.sent, counts.accepted, counts.ran, counts.completed) == (1, 1, 1, 1), counts.line()
