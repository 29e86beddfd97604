"""GPU scheduling on the emulated nodes: Slurm hands out the fake devices like real ones."""
import pytest

pytestmark = pytest.mark.slurm

SHOW = "#!/bin/bash\necho \"node=$SLURMD_NODENAME gpus=$CUDA_VISIBLE_DEVICES\"\n"


def test_four_gpu_job_on_gpu_4card_sees_all_four(slurm):
    job = slurm.sbatch(SHOW, "--partition=gpu-4card", "--gres=gpu:p40:4", "--time=2")
    assert slurm.wait(job) == "COMPLETED"
    out = job.output.read_text()
    assert "gpus=0,1,2,3" in out
    assert "node=g4n" in out


def test_one_gpu_job_on_gpu_1card(slurm):
    job = slurm.sbatch(SHOW, "--partition=gpu-1card", "--gres=gpu:p40:1", "--time=2")
    assert slurm.wait(job) == "COMPLETED"
    assert "gpus=0" in job.output.read_text()
    assert "node=g1n" in job.output.read_text()


def test_two_2gpu_jobs_on_one_4gpu_node_get_disjoint_devices(slurm):
    # both pinned to one node and held there together (sleep) so they overlap in time
    script = SHOW + "sleep 3\n"
    jobs = [slurm.sbatch(script, "--partition=gpu-4card", "--nodelist=g4n2", "--gres=gpu:p40:2",
                         "--cpus-per-task=1", "--time=2") for _ in range(2)]
    for job in jobs:
        assert slurm.wait(job) == "COMPLETED"
    seen = [job.output.read_text().split("gpus=")[1].strip() for job in jobs]
    assert sorted(seen) == ["0,1", "2,3"]


def test_asking_more_gpus_than_a_node_has_is_refused(slurm):
    with pytest.raises(AssertionError, match="Requested node configuration is not available"):
        slurm.sbatch(SHOW, "--partition=gpu-1card", "--gres=gpu:p40:2", "--time=2")
