"""The CIFAR-10 model as an inference service, through a running portal (gunicorn + reconciler) on
the dev cluster: trained for a few steps in the TensorFlow image, put in alice's folder beside
its class (model.py + model.keras), deployed with the TensorFlow image and 2 replicas (Slurm jobs
on `infer` running the serving runtime in Apptainer). curl sends PNG and JPEG test images to
/service/NAME and gets CIFAR-10 labels from both replicas; a body that is not an image gets an
error that says so, and the replica that refused it answers the next request.

Teardown deletes the service and cancels its replica jobs by id (the ``services`` fixture)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import SHARED_ROOT
from tests.examples.cifar_serving import MODEL_CLASS, encode_images, model_folder, train
from tests.portal.conftest import api_call
from tests.portal.test_services_e2e import deploy, ready, wait_for

pytestmark = [pytest.mark.portal, pytest.mark.slurm, pytest.mark.apptainer]


@pytest.fixture(scope="module")
def trained_model(tf_image, cifar_dataset):
    """model.keras after 30 training steps (~10 s; the labels need not be right, only real)."""
    out = Path(tempfile.mkdtemp(prefix="aiportal-cifar10-svc-", dir="/var/tmp"))
    yield train(tf_image, cifar_dataset, out, steps=30)
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def test_images(tf_image, cifar_dataset):
    """The first 3 test-set images as PNG and JPEG files."""
    out = Path(tempfile.mkdtemp(prefix="aiportal-cifar10-img-", dir="/var/tmp"))
    yield encode_images(tf_image, cifar_dataset, out, count=3)
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def cifar_model(trained_model):
    """The service's model folder in alice's part of the shared filesystem, owned by her."""
    pw = pwd.getpwnam("alice")
    root = model_folder(trained_model, SHARED_ROOT / "users" / "alice" / ("svc-cifar-%s" % uuid.uuid4().hex[:8]))
    for p in [root, *root.iterdir()]:
        os.chown(p, pw.pw_uid, pw.pw_gid)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def curl(base_url: str, name: str, token: str, path: Path) -> tuple[int, bytes, str]:
    """``curl -X POST URL -T FILE`` as a user types it: (status, body, X-Replica)."""
    res = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Authorization: Bearer " + token, "-T", str(path),
                          "-w", "\n%{http_code}\n%header{x-replica}", "%s/service/%s" % (base_url, name)],
                         capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    body, status, replica = res.stdout.rsplit(b"\n", 2)
    return int(status), body, replica.decode().strip()


def test_cifar10_service_labels_png_and_jpeg_over_curl_from_both_replicas(
        live_portal, tf_image, cifar_model, test_images, services, prepare_data, tmp_path):
    alice = live_portal.tokens["alice"]
    name = "cifar-%s" % uuid.uuid4().hex[:6]
    deploy(live_portal, services, alice, name, image=str(tf_image), model=str(cifar_model), class_name=MODEL_CLASS,
           replicas=2, max_batch_size=8)
    t0 = time.monotonic()
    wait_for(live_portal, alice, name, ready(2), timeout=300, what="2 ready replicas")
    print("2 TensorFlow replicas ready in %.1fs" % (time.monotonic() - t0))
    url = live_portal.service_url

    # every image, as PNG and as JPEG, gets a CIFAR-10 label; requests go to both replicas, and
    # both label an image the same way (the same weights)
    labels: dict[Path, set[bytes]] = {}
    replicas: set[str] = set()
    for _ in range(3):
        for image in test_images:
            for path in (image.png, image.jpeg):
                status, body, replica = curl(url, name, alice, path)
                assert status == 200, (path.name, status, body)
                assert body.decode() in prepare_data.LABELS, (path.name, body)
                labels.setdefault(path, set()).add(body)
                replicas.add(replica)
    assert len(replicas) == 2, replicas
    assert all(len(answers) == 1 for answers in labels.values()), labels
    print("labels: %s" % {p.name: a.pop().decode() for p, a in labels.items()})

    # not an image: an error naming the reason; the replica that refused it still answers
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    status, body, refused_by = curl(url, name, alice, text)
    assert status == 500, (status, body)
    error = json.loads(body)
    assert error["error"] == "model_error" and "is not a JPEG, PNG, GIF or BMP image" in error["message"], error
    answered = set()
    for _ in range(6):
        status, body, replica = curl(url, name, alice, test_images[0].png)
        assert status == 200 and body.decode() in prepare_data.LABELS, (status, body)
        answered.add(replica)
    assert refused_by in answered, (refused_by, answered)
    svc = api_call(live_portal, "GET", "/services/%s" % name, alice)[1]
    assert svc["ready_replicas"] == 2, svc
