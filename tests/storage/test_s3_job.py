"""A real Slurm job, as alice, whose input comes from S3 and whose outputs go back to S3: the
portal validates the locations, writes the job's credentials file, and the batch script passes
only its path to `aiportal stage`. The keys never show in the script, `scontrol show job`, the
job's environment or its log."""
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from portal.services.job_data import check_job_data, finish_job_data
from tests.cluster.test_execution import make_request, submit_training
from portal.settings import Settings
from slurm.backend import SlurmCli
from slurm.states import JobState
from storage.credentials import JOB_CREDENTIALS_NAME
from storage.errors import LocationError
from storage.stage import stage_in, stage_out
from tests.conftest import JOB_USER
from tests.storage.s3_helpers import admin_source, drop_bucket, make_bucket, tree_digest

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def source():
    return admin_source(json.loads(Path("/etc/aiportal/s3-admin.json").read_text()))


@pytest.fixture
def bucket(source):
    name = make_bucket(source, "job")
    yield name
    drop_bucket(source, name)


@pytest.fixture(scope="module")
def settings():
    # the `aiportal` of this checkout, not the copy Ansible installed into /opt/aiportal/venv at
    # the last provisioning (which may predate the code under test)
    return Settings.load(require_secrets=False)


PROGRAM = ("import json, os; d = sorted(os.listdir('/data/data')); "
           "prev = open('/data/output/runs.txt').read() if os.path.exists('/data/output/runs.txt') else ''; "
           "open('/data/output/runs.txt', 'w').write(prev + 'run\\n'); "
           "open('/data/output/result.json', 'w').write(json.dumps({'inputs': d, "
           "'hello': open('/data/data/hello.txt').read(), 'uid': os.getuid()})); "
           "os.makedirs('/data/output/ckpt', exist_ok=True); "
           "open('/data/output/ckpt/model.bin', 'wb').write(open('/data/data/nested/weights.bin', 'rb').read()[::-1]); "
           "print('ENV', sorted(os.environ.items()), flush=True)")


@pytest.mark.slurm
@pytest.mark.apptainer
def test_job_stages_in_from_s3_and_out_to_s3(settings, source, bucket, base_image, tmp_path):
    dataset = tmp_path / "dataset"
    (dataset / "nested").mkdir(parents=True)
    (dataset / "hello.txt").write_text("hello from S3\n")
    (dataset / "nested" / "weights.bin").write_bytes(os.urandom(3 << 20))
    (dataset / "ünï ✓.txt").write_text("unicode\n")
    stage_out(str(dataset), "s3://%s/datasets/d1" % bucket, credentials={source.name: source})
    out_uri = "s3://%s/jobs/%s" % (bucket, uuid.uuid4().hex[:8])
    req = make_request(base_image, node_type="1card", name="s3-job",
                       time_limit="5", command=("python3", "-c", PROGRAM),
                       inputs=("s3://%s/datasets/d1" % bucket,), output=out_uri)
    backend = SlurmCli(timeout=20)
    job_id, spec, _ = submit_training(settings, backend, req, sources={source.name: source})
    job_dir = Path(spec.job_dir)
    try:
        creds = job_dir / JOB_CREDENTIALS_NAME
        st = creds.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pwd.getpwnam(JOB_USER).pw_uid
        assert spec.credentials_file == JOB_CREDENTIALS_NAME
        secrets = (source.secret_key, source.access_key)
        script = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True,
                                text=True, timeout=20).stdout
        assert '--credentials "$AIPORTAL_JOB_DIR"/.aiportal-credentials.json' in script
        deadline = time.monotonic() + 180
        while True:
            status = backend.statuses([job_id]).get(job_id)
            if status and status.state.terminal:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        show = subprocess.run(["scontrol", "show", "job", "-dd", job_id], capture_output=True, text=True,
                              timeout=20).stdout
        log = next((job_dir / "logs").glob("slurm-*.out")).read_text()
        assert status.state is JobState.COMPLETED, log
        for secret in secrets:
            assert secret not in script and secret not in show and secret not in log
        assert "ENV [" in log                                   # the job's environment was listed ...
        assert "stage in s3://%s/datasets/d1: 3 files, 3.1 MB" % bucket in log and "3 files: 3 copied" in log, log
        assert "[aiportal stage] out" in log and "3 files: 3 copied" in log.split("stage out: output/")[1]

        got = tmp_path / "got"
        stage_in(out_uri, str(got), credentials={source.name: source})
        result = json.loads((got / "result.json").read_text())
        assert result == {"inputs": ["hello.txt", "nested", "ünï ✓.txt"], "hello": "hello from S3\n",
                          "uid": pwd.getpwnam(JOB_USER).pw_uid}
        assert (got / "ckpt" / "model.bin").read_bytes() == (dataset / "nested" / "weights.bin").read_bytes()[::-1]
        assert tree_digest(got) == tree_digest(job_dir / "output")

        assert not creds.exists()                 # the script removed the keys after staging out
        assert finish_job_data(job_dir) == []
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        shutil.rmtree(job_dir, ignore_errors=True)


def test_bad_locations_are_refused_before_submission(settings, source, bucket, tmp_path):
    sources = {source.name: source}
    user_root = "%s/users/%s" % (settings.shared_root, JOB_USER)

    class NoBackend:
        def submit(self, *a, **kw):
            raise AssertionError("nothing may be submitted")

    def req(inputs=(), output=None):
        return make_request("/nonexistent.sif", node_type="1card", command=("true",), inputs=inputs, output=output)
    cases = [
        (req(inputs=("s3://no-such-bucket-%d/x" % os.getpid(),)), r"bucket 'no-such-bucket-\d+' does not exist"),
        (req(inputs=("s3://%s/nothing-here" % bucket,)), "no objects under this prefix"),
        (req(output="%s/../bob/out" % user_root), "'..'"),
        (req(output="%s/users/bob/out" % settings.shared_root), "outside the data roots"),
        (req(inputs=("ftp://host/x",)), "unknown scheme"),
        (req(inputs=("s3://%s/x" % bucket,)), None),
    ]
    for request, message in cases[:-1]:
        with pytest.raises(LocationError, match=message):
            submit_training(settings, NoBackend(), request, sources=sources)
    with pytest.raises(LocationError, match="no data source credentials"):
        check_job_data(settings, JOB_USER, ("s3://%s/x" % bucket,), None, sources={})
    # a symlink in alice's folder that points out of her root
    link_parent = Path(user_root) / ("test-link-%s" % uuid.uuid4().hex[:8])
    link_parent.mkdir()
    try:
        (link_parent / "escape").symlink_to("/etc")
        with pytest.raises(LocationError, match="symlink that leads out of the data roots"):
            check_job_data(settings, JOB_USER, (str(link_parent / "escape"),), None)
    finally:
        (link_parent / "escape").unlink()
        link_parent.rmdir()
