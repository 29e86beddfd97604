"""The Slurm CLI backend against the dev cluster: errors carry argv and stderr, users are
never root, and nothing is interpreted by a shell."""
import pytest

from slurm.backend import SlurmCli
from slurm.errors import SlurmCommandError, SubmitError

pytestmark = pytest.mark.slurm


def test_submit_refuses_root():
    with pytest.raises(SubmitError, match="never submits jobs as root"):
        SlurmCli().submit("#!/bin/bash\ntrue\n")
    with pytest.raises(SubmitError, match="never submits jobs as root"):
        SlurmCli().submit("#!/bin/bash\ntrue\n", user="root")


def test_refused_submission_raises_with_sbatchs_message():
    script = "#!/bin/bash\n#SBATCH --partition=no-such-partition\n#SBATCH --output=/dev/null\ntrue\n"
    with pytest.raises(SubmitError) as err:
        SlurmCli().submit(script, user="alice")
    e = err.value
    assert e.argv[:4] == ["runuser", "-u", "alice", "--"] and e.argv[4:] == ["sbatch", "--parsable"]
    assert e.returncode == 1
    assert "invalid partition" in e.stderr.lower()
    assert "invalid partition" in str(e).lower() and "runuser -u alice -- sbatch --parsable" in str(e)


@pytest.mark.parametrize("bad", ["1; ls", "$(id)", "12 13", "", "abc"])
def test_job_ids_are_checked_before_any_command(bad):
    with pytest.raises(ValueError, match="is not a Slurm job id"):
        SlurmCli().cancel(bad)


@pytest.mark.parametrize("user", ["bob;id", "$(id)", "Alice Smith", ""])
def test_user_names_are_checked(user):
    with pytest.raises((ValueError, SubmitError)):
        SlurmCli().submit("#!/bin/bash\ntrue\n", user=user)


def test_drain_needs_a_reason():
    with pytest.raises(ValueError, match="one-line reason"):
        SlurmCli().drain("g1n1", "two\nlines")


def test_timeout_raises_a_typed_error():
    slow = SlurmCli(timeout=0.001)
    with pytest.raises(SlurmCommandError, match="timed out.*is slurmctld running"):
        slow.cluster()


def test_statuses_of_unknown_jobs_are_left_out():
    assert SlurmCli().statuses(["999999"]) == {}
    assert SlurmCli().statuses([]) == {}


def test_queue_and_recovery_jobs_key_array_tasks_as_id_n_with_restart_counts():
    """One ``squeue -O`` form for the reconciler and the monitor: array tasks as ``ID_N`` (held,
    so not started: -O's JobID would print the array's id for each), names with spaces whole."""
    import subprocess

    from tests.conftest import JOB_USER
    out = subprocess.run(["runuser", "-u", JOB_USER, "--", "sbatch", "--parsable", "--hold", "--array", "0-2",
                          "--partition", "gpu-1card", "--output", "/dev/null", "--chdir", "/tmp", "--time", "5",
                          "--job-name", "held array, 3 tasks", "--wrap", "true"],
                         capture_output=True, text=True, check=True, timeout=30)
    jid = out.stdout.strip().split(";")[0]
    backend = SlurmCli()
    try:
        mine = {k: v for k, v in backend.queue().items() if k.split("_")[0] == jid}
        assert sorted(mine) == ["%s_%d" % (jid, i) for i in range(3)]
        assert {(v.restarts, v.name, v.reason) for v in mine.values()} == {(0, "held array, 3 tasks", "JobHeldUser")}
        tasks = backend.recovery_jobs(job_ids=[jid])
        assert sorted(tasks) == sorted(mine) and {t.restarts for t in tasks.values()} == {0}
    finally:
        backend.cancel(jid)


@pytest.mark.parametrize("returncode, stderr, down", [
    (None, "", True),                     # timed out: maybe taken, maybe not; the comment tells later
    (1, "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", True),
    (1, "sbatch: error: Batch job submission failed: Unexpected missing socket error", True),
    (1, "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", True),
    (1, "sbatch: error: Batch job submission failed: Invalid partition name specified", False),
    (1, "sbatch: error: Batch job submission failed: Requested node configuration is not available", False),
])
def test_a_controller_that_did_not_answer_is_told_from_a_refusal(returncode, stderr, down):
    from slurm.errors import SubmitError
    assert SubmitError(["sbatch"], returncode, "", stderr).controller_down is down
