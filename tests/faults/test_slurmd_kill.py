"""A node's slurmd SIGKILLed while a job runs (issue 16, fault 2).

The job's slurmstepd and program survive the kill; the controller marks the node down and the job
is requeued and started on another node. The stale run must not write after the new run starts
(docs/execution.md, "Fencing"): no line of its in the job's log after the new run's first, no
step of its in the output folder after that, no stage-out by it; its processes are gone; the job
completes once, from its checkpoint. The job takes a whole 4-card node, so the node this test
breaks runs nobody else's job."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job, User
from portal.models.jobs import JobCreate
from portal.services import accounts
from portal.services.jobs import submit_job
from slurm.backend import SlurmCli
from slurm.render import EXIT_SUPERSEDED
from slurm.states import JobState
from storage.credentials import SecretBox
from tests.conftest import JOB_USER
from tests.faults.conftest import Counts, slurm_runs
from tests.monitor.conftest import aiportal, alice_dirs, heal_node, idle_node, live_monitor, receiver  # noqa: F401
from tests.monitor.test_recovery_cluster import running_node, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.apptainer]

TOTAL = 180
TRAIN = """
import json, os, time
run = os.environ.get('SLURM_RESTART_COUNT', '0')
ck = '/data/output/ckpt.json'
start = json.load(open(ck))['step'] if os.path.exists(ck) else 0
print('run %s resumes from step %d' % (run, start), flush=True)
for step in range(start + 1, {total} + 1):
    time.sleep(0.3)
    with open('/data/output/steps.log', 'a') as fh:
        fh.write('%s %d\\n' % (run, step))
    print('run %s step %d' % (run, step), flush=True)
    if step % 5 == 0:
        with open(ck + '.tmp', 'w') as fh:
            json.dump({{'step': step}}, fh)
        os.replace(ck + '.tmp', ck)
print('run %s done' % run, flush=True)
""".format(total=TOTAL)


def _processes_of(job_id: str, run: str) -> list[int]:
    """Pids whose environment names this portal job and run (the stale run's program)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
        if env.get("AIPORTAL_JOB_ID") == job_id and env.get("SLURM_RESTART_COUNT", "0") == run:
            out.append(int(entry.name))
    return out


def _restart_slurmd(pidfile: Path, argv: list[str]) -> None:
    """Start the node's slurmd again (it daemonizes and writes its pid file), once."""
    try:
        if Path("/proc/%s" % pidfile.read_text().split()[0]).exists():
            return
    except (OSError, IndexError):
        pass
    subprocess.run(argv, check=True, timeout=30)
    wait_for(lambda: pidfile.exists() and Path("/proc/%s" % pidfile.read_text().split()[0]).exists(), 20,
             what="slurmd started again")


def _orphan_fuse(uid: int) -> set[int]:
    """Apptainer FUSE helpers of this uid that no apptainer process owns any more (a killed
    container's image, left mounted)."""
    out = set()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != uid:
                continue
            cmd = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if b"squashfuse" in cmd.split(b"\0")[0] and ppid == 1:
            out.add(int(entry.name))
    return out


def _after_first(lines: list[str], new: str, old: str) -> list[str]:
    """Lines with ``old`` that come after the first line with ``new``."""
    first = next((i for i, line in enumerate(lines) if new in line), None)
    return [] if first is None else [line for line in lines[first:] if old in line]


def test_slurmd_killed_under_a_running_job_the_stale_run_writes_nothing_after_the_new_run_starts(
        request, live_monitor, base_image, alice_dirs):  # noqa: F811
    import datetime as dt
    import pwd
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    uid = pwd.getpwnam(JOB_USER).pw_uid
    orphans_before = _orphan_fuse(uid)
    settings = live_monitor.settings
    backend = SlurmCli(timeout=20)
    idle_node(["g4n1", "g4n2"])
    with Session(live_monitor.engine, expire_on_commit=False) as db:
        user = accounts.add_user(db, "slurmdfault", JOB_USER)
        db.commit()
        job = submit_job(db, settings, backend, SecretBox(settings.data_key), db.get(User, user.id), JobCreate(
            image=str(base_image), node_type="4card", command=["python3", "-c", TRAIN],
            output=str(alice_dirs / "out"), time_limit="00:10:00", name="fenced"))
    alice_dirs.cleanup.append(job.job_dir)
    slurm_id = job.slurm_job_id
    request.addfinalizer(lambda: backend.cancel(slurm_id) if backend.recovery_jobs(job_ids=[slurm_id]) else None)
    job_dir = Path(job.job_dir)
    steps = job_dir / "output" / "steps.log"
    node = wait_for(lambda: running_node(backend, slurm_id), 120, what="job running")
    request.addfinalizer(lambda: heal_node(node))
    wait_for(lambda: steps.exists() and len(steps.read_text().split("\n")) >= 8, 120, what="7 steps done")

    # only slurmd dies: its slurmstepd and the program go on, as when a real node's slurmd crashes
    pidfile = Path("/run/slurm/slurmd-%s.pid" % node)
    pid = int(wait_for(lambda: pidfile.read_text().strip(), 20, what="slurmd's pid file"))
    argv = [a.decode() for a in Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0") if a]
    assert Path(argv[0]).name.startswith("slurmd"), argv
    os.kill(pid, signal.SIGKILL)
    request.addfinalizer(lambda: _restart_slurmd(pidfile, argv))
    t_kill = time.monotonic()
    assert _processes_of(job.id, "0"), "the first run's program should outlive its slurmd"
    other = wait_for(lambda: (lambda n: n if n and n != node else None)(running_node(backend, slurm_id)),
                     150, step=0.25, what="job running on another node")
    t_elsewhere = time.monotonic() - t_kill
    # the stale run stops within seconds of the new run's start, long before its node comes back
    wait_for(lambda: not _processes_of(job.id, "0"), 30, step=0.25, what="the stale run's program gone")
    stale_gone = time.monotonic() - t_kill
    done = job_dir / (".aiportal-run.%s:0.done" % slurm_id)
    wait_for(done.exists, 30, what="the stale run's end recorded")
    _restart_slurmd(pidfile, argv)
    heal_node(node)

    final = wait_for(lambda: (lambda s: s if s and s.state.terminal else None)(
        backend.statuses([slurm_id]).get(slurm_id)), 180, what="job finished")
    assert final.state is JobState.COMPLETED, final
    log_lines = (job_dir / "logs" / ("slurm-%s.out" % slurm_id)).read_text().splitlines()
    step_lines = steps.read_text().splitlines()
    # nothing of run 0 after run 1's first line, in the log and in the output folder
    late_log = _after_first(log_lines, "run 1 ", "run 0 ")
    late_steps = [line for line in _after_first(step_lines, "1 ", "0 ") if line.startswith("0 ")]
    assert not late_log and not late_steps, (late_log, late_steps)
    assert "got TERM" not in "\n".join(log_lines)            # the stale run never staged out on a signal
    assert sorted({int(line.split()[1]) for line in step_lines}) == list(range(1, TOTAL + 1))
    assert (alice_dirs / "out" / "ckpt.json").exists()
    wait_for(lambda: not _processes_of(job.id, "0") and not _processes_of(job.id, "1"), 15, step=0.5,
             what="no process of either run left")
    # the stale run's image was unmounted too: no FUSE helper of it left behind
    wait_for(lambda: not (_orphan_fuse(uid) - orphans_before), 15, step=0.5, what="no FUSE helper left")

    wait_for(lambda: (lambda j: j if j.state.terminal else None)(
        Session(live_monitor.engine).get(Job, job.id)), 60, what="the portal records the end")
    with Session(live_monitor.engine) as db:
        row = db.get(Job, job.id)
        requeues = db.exec(select(Event).where(Event.job_id == job.id, Event.kind == EventKind.REQUEUED)).all()
    runs = slurm_runs(JOB_USER, since).get(job.id, [])
    counts = Counts(sent=1, accepted=1, ran=1 if any(r.started for r in runs) else 0)
    counts.completed = int(row.state is JobState.COMPLETED and row.exit_code == 0)
    counts.duplicated = len({r.slurm_id for r in runs}) - 1
    counts.misreported = int(row.state is not final.state) + len(late_log) + len(late_steps)
    counts.lost = 1 - counts.ran
    print(counts.line())
    print("node %s: job on %s %.1f s after the kill; stale run's program gone %.1f s after it; %d requeue event(s); "
          "exit code of a stale run: %d" % (node, other, t_elsewhere, stale_gone, len(requeues), EXIT_SUPERSEDED))
    assert (counts.lost, counts.duplicated, counts.misreported) == (0, 0, 0) and counts.completed == 1
    assert row.restarts == 1
