"""SifCache with the real builder: offline archives of the base image (made once per session)
converted by apptainer, run, hit, raced, broken, and read by a job user."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from containers.apptainer import exec_argv, instance_run_argv
from containers.cache import SifCache
from containers.digests import file_sha256
from containers.errors import ImageBuildError
from containers.refs import parse_image_ref
from tests.conftest import JOB_AIPORTAL_VENV, JOB_USER, REPO, run

pytestmark = pytest.mark.apptainer


class Recording:
    """Wraps the cache's real builder and counts its calls."""

    def __init__(self, cache: SifCache):
        self.real = cache.builder
        self.calls: list[str] = []

    def __call__(self, ref, dest):
        self.calls.append(str(ref))
        self.real(ref, dest)


def python_prints_1(sif: Path) -> None:
    assert run(exec_argv(sif, ["python3", "-c", "print(1)"]), timeout=60) == "1\n"


@pytest.fixture(scope="module")
def shared_cache(public_tmp):
    """One cache root for the module, readable by other users."""
    return SifCache(public_tmp / "cache")


@pytest.fixture(scope="module")
def docker_sif(shared_cache, offline_image):
    builder = Recording(shared_cache)
    sif = shared_cache.ensure(parse_image_ref("docker-archive:%s" % offline_image.docker_archive),
                              builder=builder)
    assert builder.calls == ["docker-archive:%s" % offline_image.docker_archive]
    return sif


def test_docker_archive_converts_runs_and_then_hits(shared_cache, offline_image, docker_sif):
    ref = parse_image_ref("docker-archive:%s" % offline_image.docker_archive)
    assert docker_sif == shared_cache.path_for(file_sha256(offline_image.docker_archive))
    assert docker_sif.stat().st_mode & 0o777 == 0o644
    assert not list(shared_cache.images.glob(".*partial"))
    python_prints_1(docker_sif)

    again = Recording(shared_cache)
    assert shared_cache.ensure(ref, builder=again) == docker_sif
    assert again.calls == []
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert shared_cache.lookup(ref) == docker_sif
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.05, times     # target; typically well under 1 ms


def test_three_concurrent_ensures_of_an_oci_archive_build_once(tmp_path, offline_image):
    root, record, go = tmp_path / "cache", tmp_path / "calls.txt", tmp_path / "go"
    ref = "oci-archive:%s" % offline_image.oci_archive
    procs = [subprocess.Popen([sys.executable, "-m", "tests.containers.ensure_worker", str(root),
                               ref, str(record), str(go), "real"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    time.sleep(0.3)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len(record.read_text().splitlines()) == 1
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1
    sif = paths.pop()
    assert sif == SifCache(root).path_for(file_sha256(offline_image.oci_archive))
    python_prints_1(sif)


def test_oci_layout_goes_through_skopeo(tmp_path, offline_image):
    cache = SifCache(tmp_path / "cache")
    ref = parse_image_ref("oci:%s:%s" % (offline_image.oci_layout, offline_image.tag))
    index = json.loads((offline_image.oci_layout / "index.json").read_text())
    assert cache.digest_of(ref) == index["manifests"][0]["digest"]
    sif = cache.ensure(ref)
    python_prints_1(sif)
    assert not list(cache.apptainer_tmpdir.iterdir())   # the temporary oci-archive is gone


def test_definition_with_files_and_post_builds(tmp_path, base_sif):
    (tmp_path / "hello.txt").write_text("hello from %files\n")
    definition = tmp_path / "app.def"
    definition.write_text("Bootstrap: localimage\nFrom: %s\n\n%%files\n    hello.txt /opt/hello.txt\n"
                          "\n%%post\n    echo built > /opt/post.txt\n" % base_sif)
    cache = SifCache(tmp_path / "cache")
    sif = cache.ensure(parse_image_ref(str(definition)))
    out = run(exec_argv(sif, ["cat", "/opt/hello.txt", "/opt/post.txt"]))
    assert out == "hello from %files\nbuilt\n"


def test_sif_reference_is_copied_under_its_digest(tmp_path, base_sif):
    cache = SifCache(tmp_path / "cache")
    sif = cache.ensure(parse_image_ref(str(base_sif)))
    assert sif.name == file_sha256(base_sif)[7:] + ".sif"
    assert file_sha256(sif) == file_sha256(base_sif)


@pytest.mark.parametrize("scheme", ["docker-archive", "oci-archive"])
def test_corrupt_archive_raises_and_leaves_nothing(tmp_path, offline_image, scheme):
    source = offline_image.docker_archive if scheme == "docker-archive" else offline_image.oci_archive
    corrupt = tmp_path / "corrupt.tar"
    with open(source, "rb") as f:
        corrupt.write_bytes(f.read(1_000_000))
    cache = SifCache(tmp_path / "cache")
    with pytest.raises(ImageBuildError) as e:
        cache.ensure(parse_image_ref("%s:%s" % (scheme, corrupt)))
    message = str(e.value)
    assert message.startswith("`apptainer build --force --mksquashfs-args "
                              "'-comp zstd -Xcompression-level 3' %s/." % cache.images)
    assert "%s:%s` exited 255: FATAL:" % (scheme, corrupt) in message
    assert sorted(p.suffix for p in cache.images.iterdir()) == [".lock"]


def test_instance_run_passes_hostile_arguments_verbatim(docker_sif, public_tmp):
    """Images converted from Docker eval their run arguments unless --no-eval is given."""
    out = public_tmp / "instance-args.json"
    marker = public_tmp / "pwned"
    name = "aiportal-test-%d" % os.getpid()
    hostile = ['a"; touch %s; "' % marker, "$(touch %s)" % marker, "x y"]
    code = "import json, sys; json.dump(sys.argv[1:], open(%r, 'w'))" % str(out)
    run(instance_run_argv(docker_sif, name, ["python3", "-c", code, *hostile]))
    try:
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(out.read_text()) == hostile
        assert not marker.exists()
    finally:
        subprocess.run(["apptainer", "instance", "stop", name], capture_output=True, timeout=30)


def test_job_user_can_read_the_cache_and_run_its_images(shared_cache, offline_image, docker_sif,
                                                         public_tmp):
    """Conversions run as root; alice only reads: lookup works (without writing anything)
    and the SIF runs as her."""
    pwd.getpwnam(JOB_USER)
    copy = public_tmp / "alice-sees.tar"
    shutil.copyfile(offline_image.docker_archive, copy)   # unindexed: alice must hash it
    copy.chmod(0o644)
    before = sorted(p.name for p in shared_cache.root.rglob("*"))
    code = ("import sys; from pathlib import Path; from containers.cache import SifCache; "
            "from containers.refs import parse_image_ref; c = SifCache(Path(sys.argv[1])); "
            "print(c.lookup(parse_image_ref(sys.argv[2])), c.lookup(parse_image_ref(sys.argv[3])))")
    out = run(["runuser", "-u", JOB_USER, "--", str(JOB_AIPORTAL_VENV / "bin" / "python"), "-c", code,
               str(shared_cache.root), "docker-archive:%s" % offline_image.docker_archive, "docker-archive:%s" % copy],
              cwd="/")
    assert out.split() == [str(docker_sif)] * 2
    assert sorted(p.name for p in shared_cache.root.rglob("*")) == before
    out = run(["runuser", "-u", JOB_USER, "--", *exec_argv(
        docker_sif, ["python3", "-c", "import os; print(os.getuid())"])], cwd="/")
    assert out.strip() == str(pwd.getpwnam(JOB_USER).pw_uid)
