"""The fence of a requeued job's batch script, run with bash as Slurm would run two runs of one
job: a stale run stops before the new one writes anything, and a run that never answers has its
output folder set aside. The command is a stand-in for apptainer that, like a bind mount, keeps
writing into the folder it was given even when that folder is renamed."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm.render import EXIT_SUPERSEDED, fence_done, render_sbatch
from slurm.spec import JOB_OUTPUT_DIR, JobSpec

FAKE = r"""#!/bin/bash
# stand-in for `apptainer exec ... IMAGE CMD`: $1 the output folder (held like a bind mount), $2 the image
cd "$1" || exit 1
for i in $(seq "${TICKS:-100000}"); do
  echo "tick $i of $RUN"
  echo "$i" >> "ticks-$RUN"
  sleep 0.1
done
"""


@pytest.fixture
def job(tmp_path):
    fake = tmp_path / "fake-apptainer"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    job_dir = tmp_path / "job"
    (job_dir / "output").mkdir(parents=True)
    spec = JobSpec(name="fenced", partition="gpu-1card", image="/i.sif", command=["run"], job_dir=str(job_dir),
                   container=(str(fake), (JOB_OUTPUT_DIR,)), requeue=True)
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(spec))
    return script, job_dir


def start(script: Path, log: Path, run: int, **env) -> subprocess.Popen:
    """One run of Slurm job 77 (its restart count ``run``), appending to the one log file."""
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", str(script)], stdout=out, stderr=subprocess.STDOUT, cwd=str(script.parent),
                                env=dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT=str(run),
                                         RUN="run%d" % run, **env))


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in %.0f s" % timeout)


def test_a_stale_run_stops_before_the_new_run_writes_anything(job):
    script, job_dir = job
    log = job_dir / "slurm-77.out"
    old = start(script, log, 0)
    try:
        wait_for(lambda: (job_dir / "output" / "ticks-run0").exists())
        new = start(script, log, 1, TICKS="5")
        assert new.wait(timeout=30) == 0
        assert old.wait(timeout=5) == EXIT_SUPERSEDED
    finally:
        old.kill()
    lines = log.read_text().splitlines()
    waited = next(i for i, l in enumerate(lines) if "waiting up to" in l)
    stopped = next(i for i, l in enumerate(lines) if "the previous run (77:0) has stopped" in l)
    # the old run's last line comes before the new run knew it had stopped; none after
    assert all("run0" not in l for l in lines[stopped:]), lines[waited:]
    assert [l for l in lines if "run1" in l] == ["tick %d of run1" % i for i in range(1, 6)]
    # one folder: the old run was stopped, nothing to set aside; its ticks no longer grow
    ticks = (job_dir / "output" / "ticks-run0").read_text()
    time.sleep(0.5)
    assert (job_dir / "output" / "ticks-run0").read_text() == ticks
    assert not list(job_dir.glob("output.run-*"))
    # each run's end, with its exit status and whether a signal stopped it (the portal reads it)
    assert (job_dir / ".aiportal-run.77:0.done").read_text() == "%d 0\n" % EXIT_SUPERSEDED
    assert (job_dir / ".aiportal-run.77:1.done").read_text() == "0 0\n"
    assert fence_done(str(job_dir), "77")[:2] == (0, False) and fence_done(str(job_dir), "78") is None


def test_a_run_that_never_answers_keeps_its_folder_and_the_new_run_goes_on_from_a_copy(job):
    script, job_dir = job
    (job_dir / "output" / "ckpt-100").write_text("weights")
    # run 0 took the fence, then its node went silent: no "done" ever comes
    (job_dir / ".aiportal-run").write_text("77:0 g1n1\n")
    log = job_dir / "slurm-77.out"
    t0 = time.monotonic()
    new = start(script, log, 1, TICKS="3", AIPORTAL_FENCE_WAIT_S="2")
    assert new.wait(timeout=30) == 0
    assert 2 <= time.monotonic() - t0 < 15
    assert "did not answer" in log.read_text()
    assert (job_dir / "output.run-77:0" / "ckpt-100").read_text() == "weights"
    assert (job_dir / "output" / "ckpt-100").read_text() == "weights"          # resumes from a copy
    assert (job_dir / "output" / "ticks-run1").exists() and not (job_dir / "output.run-77:0" / "ticks-run1").exists()


def test_an_older_run_that_starts_late_does_not_run(job):
    script, job_dir = job
    (job_dir / ".aiportal-run").write_text("77:2 g1n3\n")
    log = job_dir / "slurm-77.out"
    assert start(script, log, 1).wait(timeout=10) == EXIT_SUPERSEDED
    assert not (job_dir / "output" / "ticks-run1").exists()
    assert (job_dir / ".aiportal-run").read_text() == "77:2 g1n3\n"


def test_a_normal_requeue_needs_no_wait(job):
    """The run before ended (requeued with SIGTERM, staged out): its done file is there."""
    import signal
    script, job_dir = job
    log = job_dir / "slurm-77.out"
    first = start(script, log, 0)
    wait_for(lambda: (job_dir / "output" / "ticks-run0").exists())
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) != 0
    t0 = time.monotonic()
    assert start(script, log, 1, TICKS="2").wait(timeout=10) == 0
    assert time.monotonic() - t0 < 2 and "waiting up to" not in log.read_text()


def test_a_run_stopped_by_a_signal_says_so(job):
    import signal
    script, job_dir = job
    run = start(script, job_dir / "slurm-77.out", 0)
    wait_for(lambda: (job_dir / "output" / "ticks-run0").exists())
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=20) != 0
    assert fence_done(str(job_dir), "77")[1] is True


def test_a_run_that_already_ended_is_not_run_twice(job):
    """A controller restarted from state saved before the run ended starts the same run again."""
    script, job_dir = job
    log = job_dir / "slurm-77.out"
    assert start(script, log, 0, TICKS="2").wait(timeout=10) == 0
    assert start(script, log, 0, TICKS="2").wait(timeout=10) == 0
    assert (job_dir / "output" / "ticks-run0").read_text().split() == ["1", "2"]        # ran once
    assert "not running it twice" in log.read_text()


def test_a_job_whose_run_completed_is_not_run_again_when_slurm_requeues_it(job):
    script, job_dir = job
    log = job_dir / "slurm-77.out"
    assert start(script, log, 0, TICKS="2").wait(timeout=10) == 0
    assert start(script, log, 1, TICKS="2").wait(timeout=10) == 0
    assert not (job_dir / "output" / "ticks-run1").exists()
    assert "run 77:0 of this job completed" in log.read_text()
