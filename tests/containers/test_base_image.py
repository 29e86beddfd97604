"""The base image, built offline from containers/definitions/debian-python.def, runs under
`apptainer exec` inside a Slurm job as a non-root user and writes through a bind mount."""
import hashlib
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.conftest import JOB_USER, REPO, SHARED_ROOT, run

pytestmark = [pytest.mark.apptainer, pytest.mark.slurm]

DEFINITION = REPO / "containers" / "definitions" / "debian-python.def"


def _drop_caps_env():
    """Root in this sandbox may lack CAP_SYS_RESOURCE; apptainer's %post then needs it dropped."""
    env = dict(os.environ)
    status = Path("/proc/self/status").read_text().splitlines()
    bnd = int(next(line.split()[1] for line in status if line.startswith("CapBnd")), 16)
    if not (bnd >> 24) & 1:
        env["APPTAINER_DROP_CAPS"] = "CAP_SYS_RESOURCE"
    return env


@pytest.fixture(scope="session")
def base_image():
    """Build once per definition digest into the shared image folder (later runs reuse it)."""
    digest = hashlib.sha256(DEFINITION.read_bytes()).hexdigest()[:16]
    out_dir = SHARED_ROOT / "images" / "base"
    out_dir.mkdir(parents=True, exist_ok=True)
    sif = out_dir / ("debian-python-%s.sif" % digest)
    if not sif.exists():
        tmp = sif.with_suffix(".sif.part")
        res = subprocess.run(["apptainer", "build", "--force", "--mksquashfs-args",
                              "-comp zstd -Xcompression-level 3", str(tmp), str(DEFINITION)],
                             capture_output=True, text=True, timeout=600, env=_drop_caps_env())
        assert res.returncode == 0, "apptainer build failed:\n%s\n%s" % (res.stdout[-3000:], res.stderr[-3000:])
        tmp.chmod(0o644)
        tmp.rename(sif)
    return sif


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
