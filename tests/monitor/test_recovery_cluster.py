"""Recovery on the real dev cluster: a job whose node dies is requeued, released from Slurm's
requeue hold, starts on another node at once, resumes from its checkpoint and completes; its
owner's webhook gets exactly one notification (two monitors run). A job that opted out of
requeue on a node that fails its health check is stopped cleanly with its outputs staged out.

Jobs ask for a whole 4-GPU node (4 GPUs, 48 CPUs), so a node these tests break runs nobody else's job."""
import time
from containers.apptainer import job_exec_prefix
from slurm.spec import JOB_DATA_DIR, JOB_OUTPUT_DIR
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job, User
from portal.services import accounts
from portal.models.jobs import JobCreate
from portal.services.jobs import submit_job
from slurm.backend import SlurmCli
from slurm.render import render_sbatch
from slurm.spec import JobSpec
from slurm.states import JobState
from storage.credentials import SecretBox
from tests.monitor.conftest import aiportal, heal_node, idle_node, wait_node

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]

EVERY = 5       # checkpoint every 5 steps
TRAIN = """
import json, os, time
ck = '/data/output/ckpt.json'
start = json.load(open(ck))['step'] if os.path.exists(ck) else 0
print('resume from step %d' % start, flush=True)
for step in range(start + 1, {total} + 1):
    time.sleep({pace})
    with open('/data/output/steps.log', 'a') as fh:
        fh.write('%d\\n' % step)
    print('step %d' % step, flush=True)
    if step % {every} == 0:
        with open(ck + '.tmp', 'w') as fh:
            json.dump({{'step': step}}, fh)
        os.replace(ck + '.tmp', ck)
print('done', flush=True)
"""


def train_code(total=60, pace=0.25):
    return TRAIN.format(total=total, pace=pace, every=EVERY)


def wait_for(pred, timeout, step=0.5, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(step)
    raise AssertionError("%s not met within %ss" % (what, timeout))


def running_node(backend, slurm_id):
    st = backend.recovery_jobs(job_ids=[slurm_id]).get(slurm_id)
    return st.nodes if st and st.state is JobState.RUNNING else None


def test_node_death_requeues_restarts_elsewhere_at_once_resumes_and_notifies_once(
        request, live_monitor, receiver, base_image, alice_dirs):
    settings = live_monitor.settings
    backend = SlurmCli(timeout=20)
    idle_node(["g4n1", "g4n2"])
    with Session(live_monitor.engine, expire_on_commit=False) as db:
        alice = accounts.add_user(db, "alice", "alice")
        db.commit()
        job = submit_job(db, settings, backend, SecretBox(settings.data_key), db.get(User, alice.id), JobCreate(
            image=str(base_image), node_type="4card", command=["python3", "-c", train_code()],
            output=str(alice_dirs / "out"), time_limit="00:10:00", name="ckpt"))
    alice_dirs.cleanup.append(job.job_dir)
    slurm_id = job.slurm_job_id
    request.addfinalizer(lambda: backend.cancel(slurm_id) if backend.recovery_jobs(job_ids=[slurm_id]) else None)
    steps = Path(job.job_dir) / "output" / "steps.log"
    node = wait_for(lambda: running_node(backend, slurm_id), 120, what="job running")
    request.addfinalizer(lambda: heal_node(node))
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 12, 120, what="12 steps done")

    aiportal("dev", "fail-node", node, "--mode", "slurmd")
    done_before = len(steps.read_text().split())
    *_, took_down = wait_node(node, lambda s, r: s.startswith("down"), timeout=120, step=0.5)
    t_down = time.monotonic()
    other = wait_for(lambda: (lambda n: n if n and n != node else None)(running_node(backend, slurm_id)),
                     90, step=0.25, what="job running on another node")
    t_elsewhere = time.monotonic() - t_down
    assert t_elsewhere < 60, "running on %s %.0fs after %s went down" % (other, t_elsewhere, node)
    heal_node(node)

    final = wait_for(lambda: (lambda s: s if s and s.state.terminal else None)(
        backend.statuses([slurm_id]).get(slurm_id)), 180, what="job finished")
    assert final.state is JobState.COMPLETED, final
    log = (Path(job.job_dir) / "logs" / ("slurm-%s.out" % slurm_id)).read_text()
    resumed = [int(line.split()[-1]) for line in log.splitlines() if line.startswith("resume from step")]
    assert resumed[0] == 0 and len(resumed) == 2 and resumed[1] >= 10, resumed
    ran = [int(x) for x in steps.read_text().split()]
    assert sorted(set(ran)) == list(range(1, 61))                  # every step done
    redone = len(ran) - 60
    assert redone <= EVERY, "redid %d steps (checkpoint every %d)" % (redone, EVERY)
    assert (alice_dirs / "out" / "ckpt.json").exists()              # staged out at the end
    print("node %s down %.0fs after the kill; job on %s %.1fs later; %d of %d steps redone"
          % (node, took_down, other, t_elsewhere, redone, done_before))

    # one event on the job's timeline per requeue, and exactly one webhook call for it
    got = receiver.wait_for(lambda b: any(x["job"] and x["job"]["id"] == job.id for x in b), 30)
    time.sleep(4)                              # room for a duplicate to show up, if there were one
    mine = [b for b in receiver.bodies() if b["job"] and b["job"]["id"] == job.id]
    assert [b["kind"] for b in mine] == ["requeued"], mine
    assert mine[0]["user"]["name"] == "alice" and node in mine[0]["message"] and mine[0]["node"] == node
    assert len({b["event_id"] for b in receiver.bodies()}) == len(receiver.bodies())
    with Session(live_monitor.engine) as db:
        evs = db.exec(select(Event).where(Event.job_id == job.id, Event.kind == EventKind.REQUEUED)).all()
        assert len(evs) == 1 and evs[0].key == "requeue:%s:0" % slurm_id and evs[0].notified_at is not None
        assert db.get(Job, job.id).restarts == 1
        down = db.exec(select(Event).where(Event.node == node, Event.kind == EventKind.NODE_DOWN,
                                           Event.job_id.is_(None))).all()
        assert len(down) == 1                 # the node's failure on the cluster page, once
    assert got


def test_no_requeue_job_on_a_failing_node_is_stopped_and_its_outputs_staged_out(
        request, live_monitor, receiver, base_image, alice_dirs):
    import pwd
    backend = SlurmCli(timeout=20)
    with Session(live_monitor.engine) as db:       # a portal user for alice: her plain sbatch jobs are hers
        accounts.add_user(db, "alice", "alice")
        db.commit()
    node = idle_node(["g4n2", "g4n1"])
    job_dir = alice_dirs / "job"
    for d in (job_dir, job_dir / "logs", job_dir / "output"):
        d.mkdir()
        pw = pwd.getpwnam("alice")
        __import__("os").chown(d, pw.pw_uid, pw.pw_gid)
    spec = JobSpec(name="noreq", partition="gpu-4card", image=str(base_image), job_dir=str(job_dir),
                   command=("python3", "-c", train_code(total=400, pace=0.25)), cpus=48, gpus=4, gpu_type="p40",
                   time_limit="00:10:00", output=str(alice_dirs / "out"), requeue=False,
                   stage_bin=live_monitor.settings.stage_bin,
                   container=job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, nv=True))
    slurm_id = backend.submit(render_sbatch(spec), user="alice")
    request.addfinalizer(lambda: backend.cancel(slurm_id) if backend.recovery_jobs(job_ids=[slurm_id]) else None)
    on = wait_for(lambda: running_node(backend, slurm_id), 120, what="job running")
    request.addfinalizer(lambda: heal_node(on))
    steps = job_dir / "output" / "steps.log"
    wait_for(lambda: steps.exists() and len(steps.read_text().split()) >= 6, 120, what="6 steps done")

    aiportal("dev", "fail-node", on, "--mode", "gpu")
    final = wait_for(lambda: (lambda s: s if s and s.state.terminal else None)(
        backend.statuses([slurm_id]).get(slurm_id)), 90, what="job stopped")
    # stopped by SIGTERM (the program's status: 15 from apptainer, 143 from a shell), not requeued
    assert final.state is JobState.FAILED and final.exit_code in (15, 143), final
    log = (job_dir / "logs" / ("slurm-%s.out" % slurm_id)).read_text()
    assert "got TERM" in log and "stage out" in log
    assert (alice_dirs / "out" / "steps.log").exists()           # outputs staged out
    # recorded once, whichever monitor sent the signal (the deployed one acts on the cluster too)
    def stop_events():
        with Session(live_monitor.engine) as db:
            return db.exec(select(Event).where(Event.key == "stop:%s:0" % slurm_id)).all()
    evs = wait_for(stop_events, 20, what="the stop recorded")
    # healed only now: the deployed monitor (its own database) may have sent the SIGTERM, and
    # then this test's monitors record the stop when the job leaves the queue from a node still
    # drained for the failure; a node resumed first would leave them nothing to record (with
    # one shared database, the monitor that acts records it itself)
    heal_node(on)
    assert len(evs) == 1 and "opted out of requeue" in evs[0].message and evs[0].node == on
    got = receiver.wait_for(lambda b: any(x["event_id"] == evs[0].id for x in b), 20)
    assert [x["event_id"] for x in got].count(evs[0].id) == 1
    wait_node(on, lambda s, r: s in ("idle", "mixed") and not r, timeout=60)
