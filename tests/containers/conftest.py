"""Fixtures of the containers tests: the base SIF, and offline archives made from it once per
session (apptainer sandbox -> umoci -> skopeo, ~6 s), under a directory other users can read."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from containers.builder import ApptainerBuilder, OfflineImage, archives_from_sif
from containers.refs import parse_image_ref
from tests.conftest import REPO, SHARED_ROOT

BASE_DEFINITION = REPO / "containers" / "definitions" / "debian-python.def"


@pytest.fixture(scope="session")
def public_tmp():
    """A session directory (0755) that job users such as alice can read."""
    d = Path(tempfile.mkdtemp(prefix="aiportal-containers-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def base_sif():
    """The base image (debian-python.def), named by its definition digest like
    tests/containers/test_base_image.py; built here (~40 s) only when it is missing."""
    digest = hashlib.sha256(BASE_DEFINITION.read_bytes()).hexdigest()[:16]
    sif = SHARED_ROOT / "images" / "base" / ("debian-python-%s.sif" % digest)
    if not sif.exists():
        sif.parent.mkdir(parents=True, exist_ok=True)
        tmp = sif.with_suffix(".sif.part")
        ApptainerBuilder(timeout=600)(parse_image_ref(str(BASE_DEFINITION)), tmp)
        tmp.chmod(0o644)
        os.rename(tmp, sif)
    return sif


@pytest.fixture(scope="session")
def offline_image(base_sif, public_tmp) -> OfflineImage:
    """The base image as an OCI layout, an oci-archive and a docker-archive (CMD python3)."""
    return archives_from_sif(base_sif, public_tmp / "image", name="aiportal/test-py")
