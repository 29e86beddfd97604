"""The CIFAR-10 walkthrough through a running portal (gunicorn + reconciler) on the dev cluster,
with the TensorFlow image, real Apptainer and the real S3 store.

prepare_data.py writes the synthetic dataset and uploads it and the code to a bucket; alice
registers that bucket as a data source and submits over the API. On gpu-1card the job stages
data and code in, trains, checkpoints on Slurm's USR1 (passed on by the batch script), stages
checkpoints, model and metrics out, and ends COMPLETED with the loss going down; its model
then answers the inference class's checks inside the image. On gpu-4card the program sees the
four GPUs Slurm allocated (and says it trains on the CPU: they are fake). When the node under a
running job dies, Slurm requeues the job, it runs on the other node, resumes from its last
checkpoint and stops at the total step count."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from storage.s3 import S3Store
from tests.conftest import JOB_AIPORTAL_VENV, run
from tests.examples.conftest import CHECKS, EXAMPLE
from tests.portal.conftest import api_call
from tests.portal.test_e2e import wait_state
from tests.storage.s3_helpers import admin_source, drop_bucket, make_bucket

pytestmark = [pytest.mark.portal, pytest.mark.slurm, pytest.mark.s3, pytest.mark.apptainer]

ADMIN_CREDENTIALS = "/etc/aiportal/s3-admin.json"


@pytest.fixture(scope="module")
def cifar_bucket(s3_credentials, prepare_data):
    """A bucket holding cifar10/data/cifar-10-batches-bin/ (1 training file + the test file)
    and cifar10/code/{train,model}.py, uploaded by prepare_data.py itself."""
    src = admin_source(s3_credentials)
    bucket = make_bucket(src, "cifar10")
    try:
        with tempfile.TemporaryDirectory(prefix="aiportal-cifar10-prep-", dir="/var/tmp") as tmp:
            rc = prepare_data.main(["--synthetic", "--dest", tmp, "--train-files", "1",
                                    "--upload", "s3://%s/cifar10/data" % bucket,
                                    "--upload-code", "s3://%s/cifar10/code" % bucket,
                                    "--credentials", ADMIN_CREDENTIALS,
                                    "--aiportal", str(JOB_AIPORTAL_VENV / "bin" / "aiportal")])
        assert rc == 0
        with S3Store(src) as s:
            keys = sorted(o.key for o in s.list(bucket, "cifar10/"))
        assert keys == ["cifar10/code/model.py", "cifar10/code/train.py",
                        "cifar10/data/cifar-10-batches-bin/batches.meta.txt",
                        "cifar10/data/cifar-10-batches-bin/data_batch_1.bin",
                        "cifar10/data/cifar-10-batches-bin/test_batch.bin"]
        yield bucket
    finally:
        drop_bucket(src, bucket)


@pytest.fixture(scope="module")
def source(live_portal, s3_credentials, cifar_bucket):
    """alice's data source for the bucket (removed afterwards)."""
    name = "cifar-%s" % uuid.uuid4().hex[:8]
    status, body = api_call(live_portal, "POST", "/datasources", live_portal.tokens["alice"], {
        "name": name, "endpoint": s3_credentials["endpoint"], "region": s3_credentials["region"],
        "access_key": s3_credentials["access_key"], "secret_key": s3_credentials["secret_key"],
        "buckets": [cifar_bucket]})
    assert status == 201, body
    yield name
    api_call(live_portal, "DELETE", "/datasources/%s" % name, live_portal.tokens["alice"])


def submit(portal, bucket: str, image: Path, node_type: str, out: str, *train_args: str) -> dict:
    status, job = api_call(portal, "POST", "/jobs", portal.tokens["alice"], {
        "image": str(image), "node_type": node_type, "name": "cifar10-%s" % node_type,
        "command": ["python3", "/data/data/train.py", *train_args],
        "inputs": ["s3://%s/cifar10/data" % bucket, "s3://%s/cifar10/code" % bucket],
        "output": "s3://%s/%s" % (bucket, out), "time_limit": "00:15:00"})
    assert status == 201, job
    return job


def job_log(portal, job_id: str) -> str:
    status, log = api_call(portal, "GET", "/jobs/%s/log" % job_id, portal.tokens["alice"])
    assert status == 200
    return log.decode(errors="replace") if isinstance(log, bytes) else ""


def wait_log(portal, job_id: str, pattern: str, timeout: float = 180) -> re.Match:
    """The first match of ``pattern`` in the job's log; fails at once if the job ends without it."""
    deadline = time.monotonic() + timeout
    text, state = "", ""
    while time.monotonic() < deadline:
        text = job_log(portal, job_id)
        m = re.search(pattern, text)
        if m:
            return m
        status, job = api_call(portal, "GET", "/jobs/%s" % job_id, portal.tokens["alice"])
        state = job.get("state", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            text = job_log(portal, job_id)
            if re.search(pattern, text):
                return re.search(pattern, text)
            raise AssertionError("job %s ended %s (%s) without %r in its log:\n%s"
                                 % (job_id, state, job.get("reason"), pattern, text[-3000:]))
        time.sleep(0.3)
    raise AssertionError("no %r in the log of job %s (%s) after %ss:\n%s" % (pattern, job_id, state, timeout,
                                                                           text[-3000:]))


def s3_json(s3_credentials, bucket: str, key: str) -> dict:
    with S3Store(admin_source(s3_credentials)) as s:
        return json.loads(s.client.get_object(Bucket=bucket, Key=key)["Body"].read())


def s3_keys(s3_credentials, bucket: str, prefix: str) -> list[str]:
    with S3Store(admin_source(s3_credentials)) as s:
        return sorted(o.key[len(prefix):] for o in s.list(bucket, prefix))


def job_dir_of(job: dict) -> Path:
    return Path(re.search(r"^#SBATCH --chdir=(\S+)$", job["script"], re.M).group(1))


def test_1card_stages_in_trains_checkpoints_on_usr1_and_stages_out(live_portal, s3_credentials, cifar_bucket, source,
                                                                   tf_image, cifar_dataset, cifar_jobs):
    alice = live_portal.tokens["alice"]
    job = submit(live_portal, cifar_bucket, tf_image, "1card", "runs/1card", "--max_steps", "300", "--batch_size", "64",
                 "--checkpoint_every", "100", "--log_every", "10", "--eval_examples", "2000")
    cifar_jobs.append(job)
    # Slurm's checkpoint warning (--signal=B:USR1@120) goes to the batch shell, which passes it
    # on through apptainer to the program; send the same signal the same way, mid-training
    wait_log(live_portal, job["id"], r"starting at step 0")
    run(["scancel", "--batch", "--signal=USR1", job["slurm_job_id"]], timeout=30)
    done = wait_state(live_portal, alice, job["id"], timeout=300)
    log = job_log(live_portal, job["id"])
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0, (done, log[-4000:])

    # data and code came in from S3; the program saw the GPU Slurm gave it and ran on the CPU
    assert "stage in: s3://%s/cifar10/data -> data/" % cifar_bucket in log
    assert "CUDA_VISIBLE_DEVICES=0 (1 GPU(s) allocated); TensorFlow sees 0 GPU(s)" in log
    assert "got USR1: passing it on so the program can checkpoint" in log
    usr1 = int(re.search(r"checkpoint at step (\d+) \(got SIGUSR1\)", log).group(1))
    assert 0 < usr1 < 300
    assert "done: step 300 of 300 (300 this run)" in log

    # the loss the portal plots goes down
    status, prog = api_call(live_portal, "GET", "/jobs/%s/progress" % job["id"], alice)
    points = prog["points"]
    assert [p["step"] for p in points] == list(range(10, 301, 10))
    losses = [p["loss"] for p in points]
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    assert all(p["examples_per_sec"] > 0 for p in points)

    # checkpoints, the model and the metrics are in S3
    keys = s3_keys(s3_credentials, cifar_bucket, "runs/1card/")
    assert {"metrics.json", "model/model.keras", "checkpoints/checkpoint", "checkpoints/ckpt-300.index"} <= set(keys), keys
    metrics = s3_json(s3_credentials, cifar_bucket, "runs/1card/metrics.json")
    assert (metrics["state"], metrics["final_step"], metrics["steps_this_run"]) == ("finished", 300, 300)
    assert metrics["loss_history"][-1][1] < metrics["loss_history"][0][1]
    assert metrics["test_examples"] == 2000 and metrics["test_accuracy"] > 0.5

    # the trained model behind the inference class, inside the image, on PNG and JPEG bytes
    out = job_dir_of(done) / "output"
    res = subprocess.run(["apptainer", "exec", "--no-mount", "cwd", "--bind", "%s:/code" % EXAMPLE,
                          "--bind", "%s:/checks" % CHECKS, "--bind", "%s:/model" % out,
                          "--bind", "%s:/data" % cifar_dataset, str(tf_image),
                          "python3", "/checks/model_check.py", "/model", "--images", "60", "--min-accuracy", "0.5"],
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["accuracy_png"] >= 0.5 and summary["png_jpeg_agree"] >= 0.8, summary


def test_4card_job_sees_four_gpus(live_portal, cifar_bucket, source, tf_image, cifar_jobs):
    job = submit(live_portal, cifar_bucket, tf_image, "4card", "runs/4card", "--max_steps", "20", "--batch_size", "32",
                 "--log_every", "10", "--eval_examples", "0")
    cifar_jobs.append(job)
    done = wait_state(live_portal, live_portal.tokens["alice"], job["id"], timeout=300)
    log = job_log(live_portal, job["id"])
    assert done["state"] == "COMPLETED" and done["partition"] == "gpu-4card" and done["gpus"] == 4, (done, log[-3000:])
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 (4 GPU(s) allocated); TensorFlow sees 0 GPU(s)" in log
    assert "training on the CPU with one replica" in log
    assert "done: step 20 of 20" in log


# -- node failure --------------------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        return Path("/proc/%d/cmdline" % pid).read_bytes().rstrip(b"\0").decode().split("\0")
    except OSError:
        return []


def _slurmd_pid(node: str) -> int | None:
    """The pid in slurmd's pid file, if that process is the slurmd of ``node``."""
    try:
        pid = int(Path("/run/slurm/slurmd-%s.pid" % node).read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    return pid if argv and argv[0].endswith("slurmd") and "-N" in argv and node in argv else None


def _job_processes(slurm_id: str) -> list[int]:
    """The job's slurmstepd processes (``slurmstepd: [ID.batch]`` and any other step), everything
    below them, and every process whose environment names the job (one orphaned when its parent
    was killed): what dies with the node."""
    parents: dict[int, int] = {}
    roots = []
    mark = b"SLURM_JOB_ID=%s\0" % slurm_id.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z":        # dead already, waiting to be reaped
            continue
        parents[int(entry.name)] = int(ppid)
        if cmd.startswith(b"slurmstepd: [%s." % slurm_id.encode()) or (b"\0" + environ).find(b"\0" + mark) >= 0:
            roots.append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, parent in parents.items() if parent == pid]
    return sorted(found)


def _kill_job_processes(slurm_id: str, timeout: float = 15) -> list[bytes]:
    """Stop, then kill, every process of the job until none is left (a process it forks between
    the scan and the kill is found by the next scan); the command lines of those killed."""
    killed: list[bytes] = []
    deadline = time.monotonic() + timeout
    while victims := _job_processes(slurm_id):
        assert time.monotonic() < deadline, "processes of job %s still alive after %ss: %s" % (slurm_id, timeout, victims)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for victim in victims:
                try:
                    if sig == signal.SIGSTOP:
                        killed.append(Path("/proc/%d/cmdline" % victim).read_bytes())
                    os.kill(victim, sig)
                except (ProcessLookupError, FileNotFoundError):
                    pass
        time.sleep(0.2)
    return killed


def _scontrol_job(slurm_id: str) -> dict[str, str]:
    text = run(["scontrol", "-o", "show", "job", slurm_id], timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _node_state(node: str) -> str:
    return run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], timeout=30).strip()


def test_node_failure_requeues_and_resumes_from_the_last_checkpoint(live_portal, s3_credentials, cifar_bucket,
                                                                    source, tf_image, cifar_jobs,
                                                                    request):
    """The node under a running job dies: its slurmd is killed by its pid file (the argv read from
    /proc first, and started again the same way at teardown whatever happens), and so is
    everything the job runs there (on a real cluster the job dies with its node; here killing
    slurmd alone would leave slurmstepd and the program running, and finishing).

    Slurm declares the node down (SlurmdTimeout=20) and requeues the job itself (JobRequeue=1,
    --requeue). Slurm then holds a requeued job back with a begin time about two minutes away;
    once the test has seen that Slurm requeued it (Restarts >= 1, PENDING), it clears that hold
    with ``scontrol update jobid=N StartTime=now`` (what SlurmCli.requeue and the monitor do) so
    the test stays short. The job must start on the other node of gpu-1card, resume from the
    last checkpoint the first run wrote, and train only the remaining steps."""
    alice = live_portal.tokens["alice"]
    max_steps, every = 400, 100
    # both nodes of the partition up (another test, or an admin, may have one down or drained for a while)
    deadline = time.monotonic() + 120
    while {_node_state(n) for n in ("g1n1", "g1n2")} - {"idle", "mixed", "allocated"}:
        assert time.monotonic() < deadline, "gpu-1card is not healthy: %s" % {n: _node_state(n) for n in ("g1n1", "g1n2")}
        time.sleep(2)
    job = submit(live_portal, cifar_bucket, tf_image, "1card", "runs/kill", "--max_steps", str(max_steps),
                 "--batch_size", "64", "--checkpoint_every", str(every), "--log_every", "10", "--eval_examples", "0")
    slurm_id = job["slurm_job_id"]
    cifar_jobs.append(job)
    wait_log(live_portal, job["id"], r"checkpoint at step %d \(every" % every, timeout=240)
    wait_log(live_portal, job["id"], r"step %d, loss = " % (every + 30), timeout=60)    # work since then is lost
    node = run(["squeue", "-h", "-j", slurm_id, "-o", "%N"], timeout=30).strip()
    assert node in ("g1n1", "g1n2"), node
    other = {"g1n1": "g1n2", "g1n2": "g1n1"}[node]

    pid = _slurmd_pid(node)
    assert pid is not None, "no slurmd for %s in /run/slurm/slurmd-%s.pid" % (node, node)
    argv = _cmdline(pid)
    env = dict(line.split("=", 1) for line in Path("/proc/%d/environ" % pid).read_bytes().decode(
        errors="replace").split("\0") if "=" in line)
    cwd = os.readlink("/proc/%d/cwd" % pid)

    def restart_slurmd():
        """The same argv, environment and folder as the slurmd that was killed (it daemonises)."""
        if _slurmd_pid(node) is None:
            subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60, check=False)
    request.addfinalizer(restart_slurmd)

    # the node dies: slurmd first, then the job's processes on it (stopped, then killed)
    os.kill(pid, signal.SIGKILL)
    killed = _kill_job_processes(slurm_id)
    assert any(b"[%s.batch]" % slurm_id.encode() in cmd for cmd in killed), (
        "the batch step of job %s was not among its processes: %s" % (slurm_id, killed))
    killed_at = time.monotonic()
    before = job_log(live_portal, job["id"])
    last_ckpt = max(int(s) for s in re.findall(r"checkpoint at step (\d+) ", before))
    last_step = max(int(s) for s in re.findall(r"step (\d+), loss = ", before))
    assert "resuming from step" not in before

    # Slurm notices, marks the node down and requeues the job by itself
    deadline = time.monotonic() + 150
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = _scontrol_job(slurm_id)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in ("PENDING", "RUNNING"):
            break
        time.sleep(1)
    else:
        raise AssertionError("job %s was not requeued in 150 s after its node died: %s" % (slurm_id, info))
    requeued_after = time.monotonic() - killed_at
    if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
        run(["scontrol", "update", "jobid=%s" % slurm_id, "StartTime=now"], timeout=30)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = _scontrol_job(slurm_id)
        if info.get("JobState") in ("RUNNING", "COMPLETING", "COMPLETED"):
            break
        time.sleep(0.5)
    assert info.get("NodeList") == other, info
    restart_slurmd()            # the dead node may come back now: the job runs elsewhere

    done = wait_state(live_portal, alice, job["id"], timeout=240)
    log = job_log(live_portal, job["id"])
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0, (done, log[-4000:])
    assert done["restarts"] >= 1 and done["nodes"] == other, done
    assert "requeued" in [e["kind"] for e in done["events"]], done["events"]

    # the second run resumed from the first run's last checkpoint and did only what was left
    second = log[len(before):] if log.startswith(before) else log
    assert log.count("starting at step 0") == 1
    found = re.search(r"resuming from step (\d+) \(checkpoint ckpt-(\d+)\)", second)
    assert found, "the second run did not resume from a checkpoint:\n" + second[-4000:]
    resumed = int(found.group(1))
    assert resumed == last_ckpt >= every, (resumed, last_ckpt)
    steps_after = [int(s) for s in re.findall(r"step (\d+), loss = ", second.split("resuming from step", 1)[1])]
    assert steps_after[0] == resumed + 10 and steps_after[-1] == max_steps
    assert "done: step %d of %d (%d this run)" % (max_steps, max_steps, max_steps - resumed) in log
    metrics = s3_json(s3_credentials, cifar_bucket, "runs/kill/metrics.json")
    assert (metrics["start_step"], metrics["final_step"], metrics["steps_this_run"]) == \
        (resumed, max_steps, max_steps - resumed)
    # total work: the first run's steps plus the rest, far from twice max_steps
    assert last_step + metrics["steps_this_run"] < max_steps + 2 * every
    print("node %s died at step %d; requeued by Slurm after %.0f s; resumed from step %d on %s"
          % (node, last_step, requeued_after, resumed, other))


def test_preempted_job_resumes_after_requeue_from_its_staged_out_checkpoint(live_portal, s3_credentials, cifar_bucket,
                                                                             source, tf_image, cifar_jobs):
    """A running job is requeued the way an admin, a preemption or the monitor does it
    (``SlurmCli.requeue``: ``scontrol requeue``, then the begin-time hold cleared). Slurm sends
    SIGTERM to every process of the job; the batch script stages the outputs out to S3 and keeps
    the job's data-source keys (the next run needs them to stage in); the next run restores the
    outputs, resumes from the last checkpoint the first run wrote and does only the rest.

    Which checkpoint that is depends on the image mount: with unprivileged Apptainer (this dev
    cluster) the SIF is mounted by a squashfuse_ll process inside the job, which Slurm's SIGTERM
    ends too, so the program usually dies of SIGBUS before its own SIGTERM checkpoint and the last
    periodic one (--checkpoint_every) counts; with a kernel mount (setuid Apptainer) the program
    checkpoints on SIGTERM. Either way the resume step is the newest checkpoint in the log."""
    from slurm.backend import SlurmCli
    alice = live_portal.tokens["alice"]
    max_steps, every = 300, 50
    job = submit(live_portal, cifar_bucket, tf_image, "1card", "runs/preempt", "--max_steps", str(max_steps),
                 "--batch_size", "64", "--checkpoint_every", str(every), "--log_every", "10", "--eval_examples", "0")
    slurm_id = job["slurm_job_id"]
    cifar_jobs.append(job)
    wait_log(live_portal, job["id"], r"checkpoint at step %d \(every" % every, timeout=240)
    wait_log(live_portal, job["id"], r"step %d, loss = " % (every + 20), timeout=60)
    SlurmCli(timeout=30).requeue(slurm_id)
    done = wait_state(live_portal, alice, job["id"], timeout=240)
    log = job_log(live_portal, job["id"])
    assert done["state"] == "COMPLETED" and done["exit_code"] == 0 and done["restarts"] >= 1, (done, log[-4000:])
    first, sep, second = log.partition("resuming from step")
    assert sep, log[-4000:]
    assert "got TERM: stopping the program, then staging out" in first
    assert re.search(r"command exited with (?!0\b)\d+", first) and "stage out: output/ -> s3://" in first, first[-3000:]
    assert "stage in failed" not in log                         # the keys were kept for the next run
    last_ckpt = max(int(n) for n in re.findall(r"checkpoint at step (\d+) \(", first))
    resumed = int(re.match(r" (\d+) ", second).group(1))
    assert resumed == last_ckpt >= every, (resumed, last_ckpt)
    assert "done: step %d of %d (%d this run)" % (max_steps, max_steps, max_steps - resumed) in second
    metrics = s3_json(s3_credentials, cifar_bucket, "runs/preempt/metrics.json")
    assert (metrics["start_step"], metrics["steps_this_run"]) == (resumed, max_steps - resumed)
