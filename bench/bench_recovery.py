"""Health and recovery on the dev cluster, several runs of each:

1. fault -> drain: `aiportal dev fail-node NODE --mode gpu`, then the time until Slurm shows
   the node drained with an `aiportal:` reason (the node's own HealthCheckProgram does it);
   then `--heal` -> back in service (after N passing runs). Target: drain within one
   HealthCheckInterval.
2. node death -> job running elsewhere: a checkpointing job (60 steps of 0.25 s, checkpoint
   every 5) on a whole 4-GPU node; after a random 11-19 steps its node dies (`--mode slurmd`: slurmd and
   the job's processes killed). Measured: kill -> Slurm declares the node down; down -> the
   job RUNNING on the other node (the deployed `aiportal monitor` releases Slurm's ~120 s
   requeue hold); steps redone (steps.log holds every step every run did). Targets: running
   elsewhere within 60 s of the node being declared down; at most one checkpoint interval
   (5 steps) redone.

Run as root on the dev cluster with the portal role's monitor running (`make run`):

    .venv/bin/python bench/bench_recovery.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import pwd
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from containers.apptainer import job_exec_prefix
from slurm.spec import JOB_DATA_DIR, JOB_OUTPUT_DIR
from slurm.backend import SlurmCli  # noqa: E402
from slurm.render import render_sbatch  # noqa: E402
from slurm.spec import JobSpec  # noqa: E402
from slurm.states import JobState  # noqa: E402
from tests.monitor.test_recovery_cluster import EVERY, train_code  # noqa: E402

AIPORTAL = str(Path(sys.executable).parent / "aiportal")
SHARED = Path("/srv/aiportal/shared")


def sinfo(node):
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T|%E"], capture_output=True, text=True,
                         timeout=15).stdout.splitlines()[0]
    s, _, r = out.partition("|")
    return s.strip(), "" if r.strip() == "none" else r.strip()


def wait(pred, timeout, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v, time.monotonic() - t0
        time.sleep(step)
    raise SystemExit("timed out after %ss" % timeout)


def fail(node, *args):
    subprocess.run([AIPORTAL, "dev", "fail-node", node, *args], check=True, capture_output=True, timeout=120)


def interval():
    for line in subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("HealthCheckInterval"):
            return int(line.split("=")[1].split()[0])
    return 0


def idle(cands):
    return wait(lambda: next((n for n in cands if sinfo(n) == ("idle", "")), None), 300, 1)[0]


def drain_run():
    node = idle(["g1n2", "g1n1"])
    try:
        fail(node, "--mode", "gpu")
        _, to_drain = wait(lambda: sinfo(node)[1].startswith("aiportal:"), 60, 0.1)
        fail(node, "--heal")
        _, to_resume = wait(lambda: sinfo(node)[0] in ("idle", "mixed") and not sinfo(node)[1], 120, 0.2)
    finally:
        fail(node, "--heal")
    return node, to_drain, to_resume


def death_run(base_image, backend):
    user = pwd.getpwnam("alice")
    root = SHARED / "users" / "alice" / ("bench-recovery-%s" % os.urandom(3).hex())
    for d in (root, root / "job", root / "job" / "logs", root / "job" / "output"):
        d.mkdir(mode=0o700)
        os.chown(d, user.pw_uid, user.pw_gid)
    idle(["g4n1", "g4n2"])
    spec = JobSpec(name="bench-ckpt", partition="gpu-4card", image=str(base_image), job_dir=str(root / "job"),
                   command=("python3", "-c", train_code()), cpus=48, gpus=4, gpu_type="p40",
                   time_limit="00:10:00", output=str(root / "out"), stage_bin="/opt/aiportal/venv/bin/aiportal",
                   container=job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, nv=True))
    jid = backend.submit(render_sbatch(spec), user="alice")
    steps = root / "job" / "output" / "steps.log"
    node = None
    try:
        def running():
            st = backend.recovery_jobs(job_ids=[jid]).get(jid)
            return st.nodes if st and st.state is JobState.RUNNING else None
        node, _ = wait(running, 180, 0.5)
        at = random.randint(11, 19)         # anywhere within a checkpoint interval
        wait(lambda: steps.exists() and len(steps.read_text().split()) >= at, 120, 0.05)
        fail(node, "--mode", "slurmd")
        died_at = len(steps.read_text().split())      # its processes are gone once fail-node returns
        _, to_down = wait(lambda: sinfo(node)[0].startswith("down"), 120, 0.2)
        other, to_run = wait(lambda: (lambda n: n if n and n != node else None)(running()), 180, 0.1)
        fail(node, "--heal")
        wait(lambda: (lambda s: s if s and s.state.terminal else None)(backend.statuses([jid]).get(jid)), 300, 1)
        ran = [int(x) for x in steps.read_text().split()]
        final = backend.statuses([jid])[jid].state
        return node, other, to_down, to_run, len(ran) - 60, final, died_at
    finally:
        if node:
            fail(node, "--heal")
        if backend.recovery_jobs(job_ids=[jid]):
            backend.cancel(jid)
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    base = sorted((SHARED / "images" / "base").glob("debian-python-*.sif"))
    if not base:
        raise SystemExit("no base image in %s: run the test suite once (it builds it)" % (SHARED / "images" / "base"))
    backend = SlurmCli(timeout=20)
    hc = interval()
    print("HealthCheckInterval %ds; %d runs of each" % (hc, args.runs))
    print("1. fault (gpu device gone) -> drained by the node's own health check; heal -> back in service")
    drains = []
    for i in range(args.runs):
        node, d, r = drain_run()
        drains.append(d)
        print("  run %d on %s: drained after %.1fs, back %.1fs after heal" % (i + 1, node, d, r))
    print("  fault -> drain: median %.1fs, max %.1fs (target <= %ds: %s)"
          % (statistics.median(drains), max(drains), hc, "met" if max(drains) <= hc else "NOT met"))
    print("2. node death under a checkpointing job (checkpoint every %d steps)" % EVERY)
    runs = []
    for i in range(args.runs):
        node, other, to_down, to_run, redone, final, died_at = death_run(base[-1], backend)
        runs.append((to_down, to_run, redone))
        print("  run %d: %s died at step %d (checkpoint %d) -> down in %.1fs; running on %s %.1fs after that; "
              "%d steps redone; job %s" % (i + 1, node, died_at, died_at // EVERY * EVERY, to_down, other, to_run,
                                           redone, final.value))
    print("  down -> running elsewhere: median %.1fs, max %.1fs (target < 60s: %s)"
          % (statistics.median(r[1] for r in runs), max(r[1] for r in runs),
             "met" if max(r[1] for r in runs) < 60 else "NOT met"))
    print("  steps redone per failure: median %g, max %d (target <= %d: %s)"
          % (statistics.median(r[2] for r in runs), max(r[2] for r in runs), EVERY,
             "met" if max(r[2] for r in runs) <= EVERY else "NOT met"))
    print("  kill -> Slurm declares the node down: median %.1fs (SlurmdTimeout=20; Slurm's own detection)"
          % statistics.median(r[0] for r in runs))


if __name__ == "__main__":
    main()
