"""The site's base images on the provisioned dev machine (`make provision`: roles registry and
site_images): site-images.json lists python, tensorflow and pytorch; each tag resolves in the
registry to the listed digest (asked the way the portal asks: containers.registry); the SIF is
in the cache at that digest, the image builder account's; each runs its framework as a job user.

And `aiportal image publish-site` itself, end to end against a throwaway registry (plain HTTP on
loopback, bcrypt htpasswd): publish the base image (no build: its SIF is already built), seed a
cache as the builder account, write the list; a second run changes nothing."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from containers.apptainer import exec_argv
from containers.cache import SifCache
from containers.publish import KEY_LABEL, definition_key, sif_name
from containers.refs import parse_image_ref
from containers.registry import RegistryAuth, RegistryClient, RegistryConfig, write_authfile
from tests.conftest import DEFINITION, JOB_USER, REPO, free_port, run, stop_process

SITE_IMAGES = [("python", "1"), ("tensorflow", "2.21"), ("pytorch", "1.13")]
CHECKS = {
    "python": "import sys; assert sys.version_info[:2] == (3, 11), sys.version; print('ok')",
    "tensorflow": "import tensorflow as tf; assert tf.__version__.startswith('2.21'), tf.__version__; "
                  "print(float(tf.reduce_sum(tf.ones([2, 3]))))",
    "pytorch": "import torch, torch.distributed as d; assert d.is_available() and d.is_gloo_available(); "
               "print(float(torch.ones(2, 3).sum()))",
}
EXPECTED = {"python": "ok", "tensorflow": "6.0", "pytorch": "6.0"}


@pytest.fixture(scope="module")
def settings():
    from portal.settings import Settings
    return Settings.load(require_secrets=False)


@pytest.fixture(scope="module")
def listed(settings):
    path = Path(settings.site_images_file)
    if not path.is_file():
        pytest.fail("%s is missing: run `make provision` (role site_images)" % path)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def site_auth(settings):
    return RegistryAuth(settings.site_registry_user, Path(settings.site_registry_password_file).read_text().strip())


@pytest.mark.registry
def test_the_list_names_the_three_images_python_first(listed, settings):
    assert listed["format"] == "aiportal-site-images/1"
    assert [(i["name"], i["ref"], i["framework"]) for i in listed["images"]] == [
        (name, "docker://%s/site/%s:%s" % (settings.site_registry, name, tag), name) for name, tag in SITE_IMAGES]
    for image in listed["images"]:
        assert image["title"] and image["description"]


@pytest.mark.registry
def test_each_tag_resolves_to_the_listed_digest(listed, settings, site_auth):
    client = RegistryClient(settings.site_registry, site_auth, RegistryConfig(ca_file=settings.registry_ca_file))
    for image in listed["images"]:
        ref = parse_image_ref(image["ref"])
        assert client.resolve(ref.repository, ref.tag) == image["digest"], image["name"]


@pytest.mark.registry
def test_the_sif_is_cached_at_that_digest_as_the_builders(listed, settings):
    cache = SifCache(Path(settings.image_cache))
    builder = pwd.getpwnam(settings.image_builder_user).pw_uid
    for image in listed["images"]:
        sif = Path(image["sif"])
        assert sif == cache.path_for(image["digest"])
        st = sif.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (builder, 0o644), image["name"]
        assert st.st_size > 20 << 20


@pytest.mark.registry
def test_the_image_config_carries_the_definitions_environment(listed, settings, site_auth, tmp_path):
    authfile = write_authfile(tmp_path / "auth.json", {settings.site_registry: site_auth})
    for image in listed["images"]:
        config = json.loads(run(["skopeo", "inspect", "--config", "--authfile", str(authfile),
                                 image["ref"]]))["config"]
        env = dict(item.split("=", 1) for item in config["Env"])
        venv = image["name"] != "python"
        assert env["PATH"].startswith("/opt/venv/bin:") is venv, env
        assert config["Cmd"] == ["python3"]
        assert len(config["Labels"][KEY_LABEL]) == 64
        assert config["Labels"]["org.opencontainers.image.title"] == "aiportal %s" % (
            "debian-python" if image["name"] == "python" else image["name"])


@pytest.mark.registry
@pytest.mark.apptainer
@pytest.mark.parametrize("name", [n for n, _ in SITE_IMAGES])
def test_the_image_runs_its_framework_as_a_job_user(listed, name):
    image = next(i for i in listed["images"] if i["name"] == name)
    out = run(["runuser", "-u", JOB_USER, "--", *exec_argv(image["sif"], ["python3", "-c", CHECKS[name]],
                                                             silent=True)], cwd="/", timeout=180)
    assert out.strip().splitlines()[-1] == EXPECTED[name]


# -- the command, against a throwaway registry -----------------------------------------------

@pytest.fixture
def throwaway_registry(tmp_path):
    """distribution on 127.0.0.1:917x, plain HTTP, one bcrypt account; stopped by pid."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    password = "site-%s" % os.urandom(8).hex()
    port = free_port(range(9170, 9180))
    (tmp_path / "htpasswd").write_text("aiportal-site:%s\n" % bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode())
    (tmp_path / "config.yml").write_text(
        "version: 0.1\nlog: {level: warn}\nstorage: {filesystem: {rootdirectory: %s/data}}\n"
        "http: {addr: 127.0.0.1:%d}\nauth: {htpasswd: {realm: test, path: %s/htpasswd}}\n" % (tmp_path, port, tmp_path))
    pwfile = tmp_path / "password"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    with open(tmp_path / "registry.log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "config.yml")], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/v2/" % port, timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError((tmp_path / "registry.log").read_text())
                time.sleep(0.2)
        yield "127.0.0.1:%d" % port, RegistryAuth("aiportal-site", password), pwfile
    finally:
        stop_process(proc)


@pytest.mark.apptainer
def test_publish_site_against_a_throwaway_registry(throwaway_registry, base_image, settings):
    host, auth, pwfile = throwaway_registry
    builder = pwd.getpwnam(settings.image_builder_user)
    work = Path(tempfile.mkdtemp(prefix="aiportal-publish-", dir="/var/tmp"))
    try:
        work.chmod(0o755)
        base, cache = work / "base", work / "cache"
        base.mkdir()
        cache.mkdir()
        os.chown(cache, builder.pw_uid, builder.pw_gid)
        # the base image, already built: nothing to build, only to publish
        shutil.copy(base_image, base / sif_name(DEFINITION, definition_key(DEFINITION.read_bytes())))
        catalogue = work / "catalogue.json"
        catalogue.write_text(json.dumps([{"name": "python", "definition": str(DEFINITION), "tag": "1",
                                          "title": "Python 3.11 (Debian 12)", "description": "d",
                                          "framework": "python"}]))
        argv = [str(REPO / ".venv" / "bin" / "aiportal"), "image", "publish-site", "--catalogue", str(catalogue),
                "--registry", host, "--insecure", "--password-file", str(pwfile), "--base-dir", str(base),
                "--cache", str(cache), "--images-file", str(work / "site-images.json"), "--workdir", str(work)]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        assert auth.password not in first.stdout + first.stderr
        doc = json.loads((work / "site-images.json").read_text())
        [image] = doc["images"]
        digest = RegistryClient(host, auth, RegistryConfig(insecure=frozenset({host}))).resolve("site/python", "1")
        assert image["digest"] == digest and image["ref"] == "docker://%s/site/python:1" % host
        sif = Path(image["sif"])
        assert sif == SifCache(cache).path_for(digest)
        assert sif.read_bytes() == Path(base_image).read_bytes()
        owners = {p.stat().st_uid for p in cache.rglob("*")}
        assert owners == {builder.pw_uid}, "root left files in the cache"
        assert "changed: published docker://%s/site/python:1@%s" % (host, digest) in first.stdout
        assert sorted(p.name for p in work.iterdir()) == ["base", "cache", "catalogue.json", "site-images.json"]

        second = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "changed:" not in second.stdout
        assert "python: up to date" in second.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_publish_site_refuses_other_users():
    res = subprocess.run(["runuser", "-u", JOB_USER, "--", str(REPO / ".venv" / "bin" / "aiportal"), "image",
                          "publish-site", "--catalogue", "/nonexistent"], capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert res.returncode == 2
    assert "publish-site runs as root" in res.stderr
