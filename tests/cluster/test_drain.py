"""A drained node takes no new jobs and comes back on resume."""
import subprocess
import time

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slurm


def node_state(name):
    return run(["sinfo", "-h", "-N", "-n", name, "-o", "%T"]).split()[0]


@pytest.fixture
def drained_node():
    node = "g1n2"
    run(["scontrol", "update", "nodename=%s" % node, "state=drain", "reason=aiportal-test: drain test"])
    yield node
    subprocess.run(["scontrol", "update", "nodename=%s" % node, "state=resume"], capture_output=True)


def test_drained_node_takes_no_new_jobs_then_resumes(slurm, drained_node):
    assert node_state(drained_node) == "drained"
    reason = run(["sinfo", "-h", "-N", "-n", drained_node, "-o", "%E"]).strip()
    assert reason == "aiportal-test: drain test"

    job = slurm.sbatch("#!/bin/bash\necho ran on $SLURMD_NODENAME\n", "--partition=gpu-1card",
                       "--nodelist=%s" % drained_node, "--gres=gpu:p40:1", "--time=2")
    time.sleep(3)
    assert slurm.state(job) == "PENDING"
    why = run(["squeue", "-h", "-j", job.id, "-o", "%r"]).strip()
    assert why in {"ReqNodeNotAvail", "ReqNodeNotAvail, UnavailableNodes:%s" % drained_node} or \
        why.startswith("ReqNodeNotAvail")

    run(["scontrol", "update", "nodename=%s" % drained_node, "state=resume"])
    assert slurm.wait(job, timeout=60) == "COMPLETED"
    assert "ran on %s" % drained_node in job.output.read_text()
    assert node_state(drained_node) in {"idle", "mixed", "completing"}
