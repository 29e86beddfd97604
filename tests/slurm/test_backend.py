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
