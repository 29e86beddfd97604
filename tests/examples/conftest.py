"""Fixtures of the CIFAR-10 example tests: its modules loaded by path (examples/ is not a
package), a small synthetic dataset, and the TensorFlow image, converted once per definition
digest through the shared SIF cache (``aiportal image convert`` does the same)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import JOB_USER, REPO, SHARED_ROOT
from tests.portal.test_services_e2e import services  # noqa: F401 - deployed services, deleted at teardown

EXAMPLE = REPO / "examples" / "cifar10"
CHECKS = Path(__file__).resolve().parent
TF_DEFINITION = REPO / "containers" / "definitions" / "tensorflow.def"


def load_example(name: str):
    """``examples/cifar10/NAME.py`` as a module (stdlib-only modules: prepare_data, train)."""
    spec = importlib.util.spec_from_file_location("cifar10_%s" % name, EXAMPLE / ("%s.py" % name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def prepare_data():
    return load_example("prepare_data")


@pytest.fixture(scope="session")
def train_module():
    return load_example("train")


@pytest.fixture(scope="session")
def cifar_dataset(prepare_data):
    """``ROOT/cifar-10-batches-bin/`` with one training file and the test file (seed 0), in a
    folder everyone can read (jobs and containers run as other users)."""
    root = Path(tempfile.mkdtemp(prefix="aiportal-cifar10-", dir="/var/tmp"))
    root.chmod(0o755)
    prepare_data.write_synthetic(root, seed=0, train_files=1)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tf_image():
    """The TensorFlow SIF from containers/definitions/tensorflow.def, through the image cache:
    built (~70 s) only when the definition's digest is not cached yet, so later runs reuse it."""
    from containers.cache import SifCache
    from containers.refs import parse_image_ref
    from portal.settings import Settings
    settings = Settings.load(require_secrets=False)
    return SifCache(Path(settings.image_cache), build_timeout=900).ensure(parse_image_ref(str(TF_DEFINITION)))


@pytest.fixture
def cifar_jobs():
    """alice's portal jobs (API answers) a test appends: their Slurm jobs are cancelled by id and their
    job folders removed at teardown; nothing else (other test runs may have jobs of alice's)."""
    jobs: list[dict] = []
    yield jobs
    ids = [j["slurm_job_id"] for j in jobs if j.get("slurm_job_id")]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60, check=False)
    for job in jobs:
        shutil.rmtree(SHARED_ROOT / "users" / JOB_USER / "jobs" / job["id"], ignore_errors=True)
