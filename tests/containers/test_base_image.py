"""The base image, built offline from containers/definitions/debian-python.def, runs under
`apptainer exec` inside a Slurm job as a non-root user and writes through a bind mount."""
import os
import pwd

import pytest

from tests.conftest import JOB_USER, run

pytestmark = [pytest.mark.apptainer, pytest.mark.slurm]


def test_image_has_python3(base_image):
    out = run(["apptainer", "exec", str(base_image), "python3", "-c", "import sys; print(sys.version_info[:2])"])
    assert out.strip() == "(3, 11)"


def test_image_runs_in_a_slurm_job_as_the_user_through_a_bind_mount(slurm, job_dir, base_image):
    out_dir = job_dir / "output"
    out_dir.mkdir()
    pw = pwd.getpwnam(JOB_USER)
    os.chown(out_dir, pw.pw_uid, pw.pw_gid)
    script = (
        "#!/bin/bash\nset -e\n"
        "apptainer exec --bind %s:/data/output %s python3 -c "
        "'import os; open(\"/data/output/result.txt\", \"w\").write(\"uid=%%d\\n\" %% os.getuid())'\n"
        % (out_dir, base_image))
    job = slurm.sbatch(script, "--partition=gpu-1card", "--gres=gpu:p40:1", "--time=5")
    state = slurm.wait(job, timeout=180)
    log = job.output.read_text() if job.output.exists() else ""
    assert state == "COMPLETED", log
    result = out_dir / "result.txt"
    assert result.read_text() == "uid=%d\n" % pw.pw_uid
    assert result.stat().st_uid == pw.pw_uid
