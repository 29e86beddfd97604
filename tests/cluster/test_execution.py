"""The execution path on the real dev cluster: specs rendered, submitted as the user, run in
the base image under Apptainer with the fake GPUs, data staged in and out."""
import os
import pwd
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from portal.models.jobs import JobCreate
from portal.services.submit import Submission, build_spec, check, prepare_job_dir, submit
from portal.settings import Settings
from slurm.backend import SlurmCli
from slurm.render import render_sbatch
from slurm.states import JobState
from slurm.sweep import array_specs
from tests.conftest import JOB_USER, SHARED_ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]
USER_ROOT = SHARED_ROOT / "users" / JOB_USER


@pytest.fixture(scope="module")
def settings():
    return Settings.load(require_secrets=False)


@pytest.fixture
def backend():
    return SlurmCli(timeout=20)


@pytest.fixture
def submitted(backend):
    ids = []
    yield ids
    for j in ids:
        try:
            backend.cancel(j)
        except Exception:  # noqa: BLE001 - best-effort cleanup of jobs that already ended
            pass


@pytest.fixture
def user_dirs():
    """Input data and an output location owned by the job user; removed afterwards."""
    pw = pwd.getpwnam(JOB_USER)
    root = USER_ROOT / ("exec-%s" % uuid.uuid4().hex[:8])
    (root / "in" / "nested").mkdir(parents=True)
    (root / "in" / "hello.txt").write_text("hello from the input\n")
    (root / "in" / "nested" / "n.txt").write_text("nested\n")
    for dirpath, dirs, files in os.walk(root):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in files]:
            os.chown(name, pw.pw_uid, pw.pw_gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _owner(proc):
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def _is_fuse(proc):
    try:
        return any(b"fuse" in part for part in (proc / "cmdline").read_bytes().split(b"\0")[:1])
    except OSError:
        return False


def wait(backend, job_id, timeout=120, until=lambda st: st.state.terminal):
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = backend.statuses([job_id]).get(job_id)
        if st and until(st):
            return st
        time.sleep(0.5)
    raise AssertionError("job %s is %s after %ss" % (job_id, st, timeout))


@dataclass(frozen=True)
class Request:
    """A submission as the portal makes one: the create model and the site's side."""
    job: JobCreate
    sub: Submission

    @property
    def job_id(self) -> str:
        return self.sub.job_id


def make_request(image, user=JOB_USER, **kw) -> Request:
    kw = {k: (list(v) if isinstance(v, tuple) and k in ("command", "inputs") else dict(v) if k == "env" else v)
          for k, v in kw.items()}
    return Request(JobCreate(image=str(image), **kw), Submission(user=user))


def submit_training(settings, backend, req: Request, sources=None, roots=None):
    """Check and submit as the portal does: (Slurm id, spec, script)."""
    done = submit(settings, backend, check(settings, req.job, req.sub, sources, roots))
    return done.slurm_id, done.spec, done.script


def request(base_image, user_dirs, **kw):
    kw.setdefault("node_type", "4card")
    kw.setdefault("inputs", (str(user_dirs / "in"),))
    kw.setdefault("output", str(user_dirs / "out"))
    return make_request(base_image, name="exec-test", time_limit="5", **kw)


PROBE = ("import os, sys; d = os.listdir('/data/data'); "
         "open('/data/output/result.txt', 'w').write('gpus=%s inputs=%s uid=%d\\n' % "
         "(os.environ.get('CUDA_VISIBLE_DEVICES'), sorted(d), os.getuid())); "
         "print('step 1, loss = 0.5 (100.0 examples/sec; 0.1 sec/batch)'); sys.exit(int(os.environ.get('RC', '0')))")


def test_4card_job_runs_in_the_image_with_4_gpus_and_stages_out(settings, backend, submitted, base_image, user_dirs):
    # stage copy: the shared input's contents copied into /data/data (the default binds it: below)
    req = request(base_image, user_dirs, command=("python3", "-c", PROBE), stage="copy")
    job_id, spec, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    st = wait(backend, job_id)
    log = next((Path(spec.job_dir) / "logs").glob("slurm-*.out")).read_text()
    assert st.state is JobState.COMPLETED, log
    assert st.exit_code == 0 and st.nodes.startswith("g4n")
    staged = (user_dirs / "out" / "result.txt").read_text()
    assert staged == "gpus=0,1,2,3 inputs=['hello.txt', 'nested'] uid=%d\n" % pwd.getpwnam(JOB_USER).pw_uid
    assert (Path(spec.job_dir) / "output" / "result.txt").read_text() == staged
    assert "step 1, loss = 0.5" in log and "stage out: output/ ->" in log
    assert st.comment == "aiportal:%s" % req.job_id


def test_1card_job_gets_one_gpu(settings, backend, submitted, base_image, user_dirs):
    req = request(base_image, user_dirs, node_type="1card", command=("python3", "-c", PROBE))
    job_id, _, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    assert wait(backend, job_id).state is JobState.COMPLETED
    # the default: the shared input bound read-only at /data/data/NAME, nothing copied
    assert (user_dirs / "out" / "result.txt").read_text().startswith("gpus=0 inputs=['in'] ")


def test_failing_command_still_stages_out_and_keeps_its_exit_code(settings, backend, submitted, base_image, user_dirs):
    req = request(base_image, user_dirs, node_type="1card", command=("python3", "-c", PROBE), env=(("RC", "3"),))
    job_id, _, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    st = wait(backend, job_id)
    assert st.state is JobState.FAILED and st.exit_code == 3
    assert (user_dirs / "out" / "result.txt").exists()


def test_cancel(settings, backend, submitted, base_image, user_dirs):
    req = request(base_image, user_dirs, node_type="1card", command=("sleep", "300"))
    job_id, _, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    wait(backend, job_id, until=lambda st: st.state is JobState.RUNNING)
    backend.cancel(job_id, user=JOB_USER)
    assert wait(backend, job_id).state is JobState.CANCELLED
    # apptainer's FUSE helpers stop with the job (they escape proctrack/linuxproc otherwise)
    uid = pwd.getpwnam(JOB_USER).pw_uid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for p in Path("/proc").glob("[0-9]*") if _owner(p) == uid and _is_fuse(p)]
        if not left:
            break
        time.sleep(0.5)
    assert not left, [(p.name, (p / "cmdline").read_bytes()) for p in left]


def test_requeue_restarts_at_once_and_resumes_from_staged_outputs(settings, backend, submitted, base_image, user_dirs):
    # each run appends a line to a checkpoint file in /data/output, then waits to be requeued
    body = ("import os, time; p = '/data/output/runs.txt'; "
            "n = len(open(p).readlines()) if os.path.exists(p) else 0; "
            "open(p, 'a').write('run %d\\n' % (n + 1)); print('run', n + 1, flush=True); "
            "time.sleep(300 if n == 0 else 0)")
    req = request(base_image, user_dirs, node_type="1card", command=("python3", "-c", body))
    job_id, spec, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    runs = Path(spec.job_dir) / "output" / "runs.txt"
    wait(backend, job_id, until=lambda st: st.state is JobState.RUNNING)
    deadline = time.monotonic() + 60
    while not runs.exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    t0 = time.monotonic()
    backend.requeue(job_id)
    st = wait(backend, job_id, timeout=120)
    assert st.state is JobState.COMPLETED
    assert time.monotonic() - t0 < 60, "the requeued job waited for Slurm's requeue delay"
    assert (user_dirs / "out" / "runs.txt").read_text() == "run 1\nrun 2\n"


def test_sweep_array_runs_every_task(settings, backend, submitted, base_image, user_dirs):
    req = request(base_image, user_dirs, node_type="1card",
                  command=("python3", "-c", "import os; open('/data/output/p.txt', 'w').write(os.environ['LR'] + ' ' + os.environ['BS'])"))
    base = replace(build_spec(settings, req.job, req.sub), gpus=0, cpus=1, gpu_type=None)
    specs = array_specs(base, {"LR": ["0.1", "0.01", "it's 1e-3"], "BS": ["32", "64"]}, max_array_size=4)
    assert len(specs) == 2   # 6 tasks split into arrays of at most 4
    prepare_job_dir(settings, JOB_USER, req.job_id)
    ids = [backend.submit(render_sbatch(s), user=JOB_USER) for s in specs]
    submitted.extend(ids)
    deadline = time.monotonic() + 180
    for j, n in zip(ids, (4, 2)):
        while True:
            tasks = backend.array_statuses(j)
            if len(tasks) == n and all(t.state.terminal for t in tasks.values()):
                break
            assert time.monotonic() < deadline, tasks
            time.sleep(0.5)
        assert {t.state for t in tasks.values()} == {JobState.COMPLETED}
        assert sorted(tasks) == ["%s_%d" % (j, i) for i in range(n)]
    got = sorted((user_dirs / "out" / ("task-%d" % i) / "p.txt").read_text() for i in range(6))
    assert got == sorted(["0.1 32", "0.1 64", "0.01 32", "0.01 64", "it's 1e-3 32", "it's 1e-3 64"])


HOSTILE = ["two words", "it's", "'; touch /tmp/aiportal-INJECTED-1; '", "$(touch /tmp/aiportal-INJECTED-2)",
           "`touch /tmp/aiportal-INJECTED-3`", "line1\nline2", "ünïcödé ✓", "${HOME}", "*", ""]


def test_hostile_arguments_and_env_reach_the_program_verbatim_in_a_real_job(settings, backend, submitted,
                                                                           base_image, user_dirs):
    dump = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
            "if k.startswith('H_')}}, open('/data/output/dump.json', 'w'))")
    req = request(base_image, user_dirs, node_type="1card", command=("python3", "-c", dump, *HOSTILE),
                  env=tuple(("H_%d" % i, v) for i, v in enumerate(HOSTILE)))
    job_id, _, _ = submit_training(settings, backend, req)
    submitted.append(job_id)
    assert wait(backend, job_id).state is JobState.COMPLETED
    got = __import__("json").loads((user_dirs / "out" / "dump.json").read_text())
    assert got["argv"] == HOSTILE
    assert got["env"] == {"H_%d" % i: v for i, v in enumerate(HOSTILE)}
    assert not [p for p in Path("/tmp").glob("aiportal-INJECTED-*")]
