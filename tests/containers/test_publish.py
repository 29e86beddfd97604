"""containers.publish, the pure parts: the catalogue, definition keys, the OCI config, the
skopeo/umoci argv, the plan and site-images.json (read back by the portal's own reader)."""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from containers.apptainer import build_argv
from containers.publish import (FORMAT, KEY_LABEL, LAYOUT_LABEL, LAYOUT_VERSION, ImageConfig, Plan, PublishedImage,
                                PublishError, RegistryAccess,
                                RemoteImage, SiteImage, SitePublisher, definition_files, definition_key, image_env, image_labels,
                                inspect_result, leftover_pid, oci_layout_argvs, parse_catalogue, plan, sif_name, site_images_document,
                                skopeo_inspect_argv, skopeo_push_argv, stale_sifs, write_atomic)
from tests.conftest import REPO

DEFS = REPO / "containers" / "definitions"
ROLE_DEFAULTS = REPO / "ansible" / "roles" / "site_images" / "defaults" / "main.yml"
KEY = "ab" * 32


def _image(name="python", framework="python", **kw):
    return SiteImage(name=name, definition=Path("/d/%s.def" % name), tag=kw.pop("tag", "1"),
                     title=kw.pop("title", "T"), description=kw.pop("description", ""), framework=framework, **kw)


# -- the catalogue ---------------------------------------------------------------------------

def test_parse_catalogue():
    text = json.dumps([
        {"name": "python", "definition": "debian-python.def", "tag": "1", "title": "Python", "framework": "python"},
        {"name": "tensorflow", "definition": "/abs/tf.def", "tag": "2.21-gpu", "title": "TF", "description": "d",
         "framework": "tensorflow", "build_args": {"TF_PACKAGE": "tensorflow[and-cuda]==2.21.0", "A": "x"},
         "cmd": ["python3", "-q"]},
    ])
    py, tf = parse_catalogue(text, Path("/defs/sub/.."))
    assert py == SiteImage("python", Path("/defs/debian-python.def"), "1", "Python", "", "python")
    assert py.cmd == ("python3",)
    assert tf.definition == Path("/abs/tf.def")
    assert tf.build_args == (("A", "x"), ("TF_PACKAGE", "tensorflow[and-cuda]==2.21.0"))
    assert tf.cmd == ("python3", "-q")
    assert tf.ref("localhost:5000") == "localhost:5000/site/tensorflow:2.21-gpu"


GOOD = {"name": "python", "definition": "p.def", "tag": "1", "title": "P", "framework": "python"}


@pytest.mark.parametrize("change, fragment", [
    ({"name": "Python"}, "site image 'Python': name must be lower-case"),
    ({"name": "a/b"}, "name must be lower-case"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"tag": ":1"}, "tag ':1' is not a registry tag"),
    ({"tag": "x" * 129}, "is not a registry tag"),
    ({"framework": "Py Torch"}, "framework 'Py Torch' must be a lower-case word"),
    ({"definition": 3}, "definition must be a non-empty string"),
    ({"description": 1}, "description must be a string"),
    ({"build_args": {"1A": "x"}}, "build_args must map identifiers to strings"),
    ({"build_args": {"A": 1}}, "build_args must map identifiers to strings"),
    ({"build_args": ["A=1"]}, "build_args must map identifiers to strings"),
    ({"cmd": "python3"}, "cmd must be a non-empty list of strings"),
    ({"cmd": []}, "cmd must be a non-empty list of strings"),
    ({"extra": 1}, "unknown fields extra"),
])
def test_parse_catalogue_refuses(change, fragment):
    with pytest.raises(ValueError) as e:
        parse_catalogue(json.dumps([dict(GOOD, **change)]), Path("/d"))
    assert fragment in str(e.value)


@pytest.mark.parametrize("text, fragment", [
    ("{", "not JSON"),
    ("[]", "non-empty JSON list"),
    ("{}", "non-empty JSON list"),
    ("[1]", "site image 0: expected an object"),
    (json.dumps([GOOD, GOOD]), "named twice in the catalogue: python"),
])
def test_parse_catalogue_refuses_documents(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_catalogue(text, Path("/d"))
    assert fragment in str(e.value)


def test_the_roles_catalogue_lists_the_three_images_python_first():
    entries = yaml.safe_load(ROLE_DEFAULTS.read_text())["aiportal_site_images"]
    images = parse_catalogue(json.dumps(entries), DEFS)
    assert [(i.name, i.framework) for i in images] == [
        ("python", "python"), ("tensorflow", "tensorflow"), ("pytorch", "pytorch")]
    for image in images:
        assert image.definition.is_file(), image.definition
        assert image.build_args == ()


# -- keys and file names ---------------------------------------------------------------------

def test_definition_key_of_a_plain_definition_is_its_sha256():
    # tests/conftest.py names the base image debian-python-<sha256[:16]>.sif: the same file
    text = (DEFS / "debian-python.def").read_bytes()
    assert definition_key(text) == hashlib.sha256(text).hexdigest()
    assert definition_files(DEFS / "debian-python.def") == []
    assert sif_name(DEFS / "debian-python.def", definition_key(text)) == \
        "debian-python-%s.sif" % hashlib.sha256(text).hexdigest()[:16]


@pytest.mark.parametrize("name", ["tensorflow.def", "pytorch.def"])
def test_the_hosts_ca_bundle_is_not_part_of_the_key(name):
    assert definition_files(DEFS / name) == []
    text = (DEFS / name).read_bytes()
    ca = [("/etc/ssl/certs/ca-certificates.crt", "sha256:" + "1" * 64)]
    assert definition_key(text, (), ca) == definition_key(text) == hashlib.sha256(text).hexdigest()


def test_definition_key_changes_with_args_and_files():
    base = definition_key(b"x")
    with_arg = definition_key(b"x", [("A", "1")])
    assert len({base, with_arg, definition_key(b"x", [("A", "2")]), definition_key(b"y"),
                definition_key(b"x", (), [("/f", "sha256:" + "0" * 64)]),
                definition_key(b"x", (), [("/f", "sha256:" + "1" * 64)])}) == 6
    assert definition_key(b"x", [("B", "2"), ("A", "1")]) == definition_key(b"x", [("A", "1"), ("B", "2")])


def test_definition_files_hashes_what_percent_files_copies(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    d = tmp_path / "x.def"
    d.write_text("Bootstrap: docker\nFrom: debian\n%files\n    data.txt /data.txt\n"
                 "    /etc/ssl/certs/ca-certificates.crt /ca.crt\n")
    assert definition_files(d) == [(str(tmp_path / "data.txt"),
                                     "sha256:" + hashlib.sha256(b"hello").hexdigest())]


def test_stale_sifs():
    names = ["tensorflow-0123456789abcdef.sif", "tensorflow-fedcba9876543210.sif", "pytorch-0123456789abcdef.sif",
             "tensorflow-gpu-0123456789abcdef.sif", "tensorflow-xyz.sif", "tensorflow-0123456789abcdef.sif.part"]
    assert stale_sifs(names, Path("/d/tensorflow.def"), "tensorflow-0123456789abcdef.sif") == [
        "tensorflow-fedcba9876543210.sif"]


# -- the OCI config and argv -----------------------------------------------------------------

def test_image_env_keeps_the_images_own_variables():
    env0 = "\0".join([
        "APPTAINER_APPNAME=", "APPTAINER_CONTAINER=/x.sif", "SINGULARITY_NAME=x.sif", "HOME=/root", "LANG=C",
        "LD_LIBRARY_PATH=/.singularity.d/libs", "PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin",
        'PROMPT_COMMAND=PS1="Apptainer> "; unset PROMPT_COMMAND', "PS1=Apptainer> ", "PWD=/", "TERM=xterm",
        "VIRTUAL_ENV=/opt/venv", "A=b=c", "", "not a var", "1X=y"]) + "\0"
    assert image_env(env0) == ("A=b=c", "PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV=/opt/venv")
    assert image_env("LANG=C.UTF-8\0LD_LIBRARY_PATH=/opt/lib\0") == ("LANG=C.UTF-8", "LD_LIBRARY_PATH=/opt/lib")


def test_image_labels():
    labels = json.dumps({"org.opencontainers.image.title": "aiportal pytorch",
                         "org.label-schema.build-date": "Sunday_6_December", "x": "y"})
    assert image_labels(labels, KEY, "1.13") == (
        (KEY_LABEL, KEY), (LAYOUT_LABEL, LAYOUT_VERSION), ("org.opencontainers.image.title", "aiportal pytorch"),
        ("org.opencontainers.image.version", "1.13"))
    assert image_labels("not json", KEY, "1") == ((KEY_LABEL, KEY), (LAYOUT_LABEL, LAYOUT_VERSION),
                                                  ("org.opencontainers.image.version", "1"))


def test_oci_layout_argvs():
    config = ImageConfig(("PATH=/opt/venv/bin:/usr/bin",), ("python3",), (("a.b", "c d"),))
    assert oci_layout_argvs(Path("/w/oci"), "2.21", Path("/w/rootfs"), config) == [
        ["umoci", "init", "--layout", "/w/oci"],
        ["umoci", "new", "--image", "/w/oci:2.21"],
        ["umoci", "insert", "--history.created_by", "aiportal image publish-site", "--image", "/w/oci:2.21",
         "/w/rootfs", "/"],
        ["umoci", "config", "--image", "/w/oci:2.21", "--clear=config.env", "--clear=config.cmd",
         "--clear=config.entrypoint", "--config.workingdir", "/", "--config.env", "PATH=/opt/venv/bin:/usr/bin",
         "--config.cmd", "python3", "--config.label", "a.b=c d"],
    ]


def test_skopeo_argv_carry_the_authfile_never_a_password():
    tls = RegistryAccess(Path("/t/auth.json"), tls_verify=True, cert_dir=Path("/t/certs"))
    plain = RegistryAccess(Path("/t/auth.json"), tls_verify=False, cert_dir=Path("/t/certs"))
    assert skopeo_push_argv(Path("/w/oci"), "1", "localhost:5000/site/python:1", tls) == [
        "skopeo", "copy", "-q", "--format", "v2s2", "--authfile", "/t/auth.json", "--dest-tls-verify=true",
        "--dest-cert-dir", "/t/certs", "oci:/w/oci:1", "docker://localhost:5000/site/python:1"]
    assert skopeo_push_argv(Path("/w/oci"), "1", "127.0.0.1:9170/site/python:1", plain)[5:8] == [
        "--authfile", "/t/auth.json", "--dest-tls-verify=false"]
    assert skopeo_inspect_argv("localhost:5000/site/python:1", tls) == [
        "skopeo", "inspect", "--no-tags", "--authfile", "/t/auth.json", "--tls-verify=true", "--cert-dir",
        "/t/certs", "docker://localhost:5000/site/python:1"]
    assert skopeo_inspect_argv("h:1/site/p:1", plain) == [
        "skopeo", "inspect", "--no-tags", "--authfile", "/t/auth.json", "--tls-verify=false", "docker://h:1/site/p:1"]


def test_build_argv_with_build_args():
    assert build_argv("/b/x.sif", "/d/tf.def", build_args=[("TF_PACKAGE", "tensorflow[and-cuda]==2.21.0")]) == [
        "apptainer", "build", "--force", "--mksquashfs-args", "-comp zstd -Xcompression-level 3",
        "--build-arg", "TF_PACKAGE=tensorflow[and-cuda]==2.21.0", "/b/x.sif", "/d/tf.def"]


@pytest.mark.parametrize("args, fragment", [
    ([("A", "torch>=2,<3")], "apptainer splits --build-arg at commas"),
    ([("A", "x\ny")], "apptainer splits --build-arg at commas"),
    ([("1A", "x")], "build argument name '1A' is not an identifier"),
    ([("A", 1)], "build argument A 1 is not a string"),
])
def test_build_argv_refuses_build_args_apptainer_would_split(args, fragment):
    with pytest.raises(ValueError) as e:
        build_argv("/b/x.sif", "/d/x.def", build_args=args)
    assert fragment in str(e.value)


# -- the registry's answer and the plan ------------------------------------------------------

def test_inspect_result():
    out = json.dumps({"Digest": "sha256:" + "a" * 64, "Labels": {KEY_LABEL: KEY}})
    assert inspect_result("r", 0, out, "") == RemoteImage("sha256:" + "a" * 64, {KEY_LABEL: KEY})
    assert inspect_result("r", 0, json.dumps({"Digest": "sha256:" + "a" * 64, "Labels": None}), "").labels == {}
    for stderr in ("... reading manifest 1 in localhost:5000/site/python: manifest unknown: manifest unknown",
                   "... name unknown: repository name not known to registry"):
        assert inspect_result("r", 1, "", stderr) is None


@pytest.mark.parametrize("code, out, err, fragment", [
    (1, "", "unauthorized: authentication required", "cannot read r from the registry: unauthorized"),
    (1, "", "x509: certificate signed by unknown authority", "certificate signed by unknown authority"),
    (0, "nope", "", "skopeo inspect r: not JSON"),
    (0, json.dumps({"Digest": "md5:x"}), "", "no sha256 manifest digest"),
])
def test_inspect_result_raises_on_other_failures(code, out, err, fragment):
    with pytest.raises(PublishError) as e:
        inspect_result("r", code, out, err)
    assert fragment in str(e.value)


SAME = RemoteImage("sha256:" + "a" * 64, {KEY_LABEL: KEY, LAYOUT_LABEL: LAYOUT_VERSION})


@pytest.mark.parametrize("sif_exists, remote, expected", [
    (True, SAME, Plan(build=False, publish=False)),                       # warm: nothing
    (False, SAME, Plan(build=True, publish=True)),                        # SIF gone: rebuilt, pushed again
    (True, None, Plan(build=False, publish=True)),                        # registry lost it
    (True, RemoteImage(SAME.digest, {KEY_LABEL: "cd" * 32}), Plan(False, True)),   # definition changed
    (True, RemoteImage(SAME.digest, {}), Plan(False, True)),              # someone else pushed the tag
    (True, RemoteImage(SAME.digest, {KEY_LABEL: KEY}), Plan(False, True)),   # laid out by an older version
    (False, None, Plan(build=True, publish=True)),                        # cold
])
def test_plan(sif_exists, remote, expected):
    assert plan(sif_exists, remote, KEY) == expected


# -- site-images.json ------------------------------------------------------------------------

def test_site_images_document_is_what_the_portal_reads():
    from portal.services.registries import SITE_IMAGES_FORMAT, parse_site_images
    digest = "sha256:" + "b" * 64
    published = [
        PublishedImage(_image("python", title="Python 3.11 (Debian 12)", description="d"),
                       "docker://localhost:5000/site/python:1", digest, Path("/c/sha256/%s.sif" % ("b" * 64))),
        PublishedImage(_image("pytorch", "pytorch", tag="1.13", title="PyTorch"),
                       "docker://localhost:5000/site/pytorch:1.13", "sha256:" + "c" * 64, Path("/c/x.sif")),
    ]
    text = site_images_document(published)
    doc = json.loads(text)
    assert doc == {"format": FORMAT, "images": [
        {"name": "python", "ref": "docker://localhost:5000/site/python:1", "digest": digest,
         "title": "Python 3.11 (Debian 12)", "description": "d", "framework": "python",
         "sif": "/c/sha256/%s.sif" % ("b" * 64)},
        {"name": "pytorch", "ref": "docker://localhost:5000/site/pytorch:1.13", "digest": "sha256:" + "c" * 64,
         "title": "PyTorch", "description": "", "framework": "pytorch", "sif": "/c/x.sif"}]}
    assert FORMAT == SITE_IMAGES_FORMAT
    read = parse_site_images(text)
    assert [(i.name, i.digest, i.framework) for i in read] == [
        ("python", digest, "python"), ("pytorch", "sha256:" + "c" * 64, "pytorch")]


def test_write_atomic(tmp_path):
    path = tmp_path / "site-images.json"
    assert write_atomic(path, "one\n") is True
    assert path.read_text() == "one\n"
    assert path.stat().st_mode & 0o777 == 0o644
    ino = path.stat().st_ino
    assert write_atomic(path, "one\n") is False               # unchanged: not rewritten
    assert path.stat().st_ino == ino
    assert write_atomic(path, "two\n") is True
    assert path.read_text() == "two\n" and path.stat().st_ino != ino
    assert sorted(os.listdir(tmp_path)) == ["site-images.json"]


@pytest.mark.parametrize("name, pid", [
    ("aiportal-site-image-123-python-abc", 123),
    ("aiportal-site-image-9-py-torch-x_y", 9),
    ("aiportal-site-image--python-abc", None),
    ("aiportal-site-image-12a-python", None),
    ("site-image-123-python-abc", None),
])
def test_leftover_pid(name, pid):
    assert leftover_pid(name) == pid


def test_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    from containers.cache import SifCache
    base, work = tmp_path / "base", tmp_path / "work"
    base.mkdir()
    work.mkdir()
    (base / ".pytorch-0123456789abcdef.sif.77.partial").write_text("half")
    (base / "pytorch-0123456789abcdef.sif").write_text("whole")
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    (work / ("aiportal-site-image-%d-tensorflow-x" % dead)).mkdir()
    (work / ("aiportal-site-image-%d-python-y" % os.getpid())).mkdir()
    (work / "unrelated").mkdir()
    publisher = SitePublisher(registry="h:1", user="u", password_file=tmp_path / "pw", cache=SifCache(tmp_path / "c"),
                              base_dir=base, workdir=work)
    publisher._remove_leftovers()
    assert sorted(p.name for p in base.iterdir()) == ["pytorch-0123456789abcdef.sif"]
    assert sorted(p.name for p in work.iterdir()) == ["aiportal-site-image-%d-python-y" % os.getpid(), "unrelated"]
