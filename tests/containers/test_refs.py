"""parse_image_ref: accepted forms and rejections, with the exact reason, as tables."""
from pathlib import Path

import pytest

from containers.errors import ACCEPTED_FORMS, ContainerError, ImageBuildError, ImageRefError
from containers.refs import ImageRef, RefKind, absolute_ref, parse_image_ref

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, kind, location, canonical", [
    ("docker://python", RefKind.DOCKER, "python", "docker://python"),
    ("docker://python:3.11-slim", RefKind.DOCKER, "python:3.11-slim", None),
    ("docker://library/python:3.11", RefKind.DOCKER, "library/python:3.11", None),
    ("docker://ghcr.io/org/repo/img:v1.2_3", RefKind.DOCKER, "ghcr.io/org/repo/img:v1.2_3", None),
    ("docker://localhost:5000/a/b", RefKind.DOCKER, "localhost:5000/a/b", None),
    ("docker://localhost/a", RefKind.DOCKER, "localhost/a", None),
    ("docker://Registry.Example.com:443/x/y:TAG", RefKind.DOCKER,
     "Registry.Example.com:443/x/y:TAG", None),
    ("docker://python@" + D, RefKind.DOCKER, "python@" + D, None),
    ("docker://python:3@" + D, RefKind.DOCKER, "python:3@" + D, None),
    ("docker://a__b/c-d.e--f", RefKind.DOCKER, "a__b/c-d.e--f", None),
    ("docker-archive:/srv/img/py.tar", RefKind.DOCKER_ARCHIVE, "/srv/img/py.tar", None),
    ("oci-archive:/srv/img/py-oci.tar", RefKind.OCI_ARCHIVE, "/srv/img/py-oci.tar", None),
    ("oci:/srv/img/layout", RefKind.OCI_LAYOUT, "/srv/img/layout", None),
    ("oci:/srv/img/layout/", RefKind.OCI_LAYOUT, "/srv/img/layout", "oci:/srv/img/layout"),
    ("oci:/srv/img/layout:latest", RefKind.OCI_LAYOUT, "/srv/img/layout:latest", None),
    ("/srv/aiportal/shared/images/base/x.sif", RefKind.SIF,
     "/srv/aiportal/shared/images/base/x.sif", None),
    ("/home/alice/my image é.def".replace(" ", "_"), RefKind.DEFINITION,
     "/home/alice/my_image_é.def", None),
])
def test_accepted(text, kind, location, canonical):
    ref = parse_image_ref(text)
    assert ref == ImageRef(kind, location, text)
    assert str(ref) == (canonical or text)
    assert parse_image_ref(str(ref)).location == location


@pytest.mark.parametrize("text, fragment", [
    ("", "the image reference is empty"),
    ("python.sif", "relative paths and unknown schemes are not accepted"),
    ("./x.sif", "relative paths and unknown schemes are not accepted"),
    ("python:3.11", "no scheme: did you mean docker://python:3.11"),
    ("docker-archive:img.tar", "relative path 'img.tar': give an absolute path"),
    ("oci:layout:latest", "relative path 'layout': give an absolute path"),
    ("oci-archive:", "the path is empty"),
    ("/srv/x.tar", "a bare path must end in .sif (an image) or .def (a definition)"),
    ("/srv/../etc/x.sif", "the path is not normalised (no '.', '..' or '//'); use '/etc/x.sif'"),
    ("/srv//x.sif", "the path is not normalised"),
    ("/srv/./x.sif", "the path is not normalised"),
    ("/srv/a:b.sif", "':' is not allowed in paths"),
    ("docker-archive:/srv/x.tar:name:tag", "':' is not allowed in paths"),
    ("oci:/srv/layout:bad tag", "contains whitespace or control characters"),
    ("oci:/srv/layout:-bad", "tag '-bad' is not valid"),
    ("http://example.com/x.sif", "images are not downloaded over http:// here"),
    ("https://example.com/x.sif", "images are not downloaded over https:// here"),
    ("library://alpine:latest", "the Sylabs library (library://) is not reachable from this site"),
    ("oras://ghcr.io/x:1", "OCI registries (oras://) are not reachable from this site"),
    ("docker-daemon:python:3", "there is no Docker daemon on this site"),
    ("ftp://x/y.sif", "unknown or unsupported scheme 'ftp://': not reachable from this site"),
    ("docker:python", "a registry image is written docker://NAME[:TAG]"),
    ("DOCKER://python", "unknown or unsupported scheme 'DOCKER://'"),
    ("docker://", "the docker image name is empty"),
    ("docker://a b", "contains whitespace or control characters"),
    ("docker://x;rm -rf /", "contains whitespace or control characters"),
    ("docker://x;rm", "'x;rm' is not a valid docker repository name"),
    ("docker://UPPER/x", "repository name 'UPPER/x' must be lowercase"),
    ("docker://Python", "repository name 'Python' must be lowercase"),
    ("docker://$(id)", "'$(id)' is not a valid docker repository name"),
    ("docker://`id`", "'`id`' is not a valid docker repository name"),
    ("docker://a/../b", "'a/../b' is not a valid docker repository name"),
    ("docker://-a", "'-a' is not a valid docker repository name"),
    ("docker://a-", "'a-' is not a valid docker repository name"),
    ("docker://a:", "tag '' is not valid"),
    ("docker://a@", "digest '' is not valid"),
    ("docker://a:.t", "tag '.t' is not valid"),
    ("docker://a:" + "t" * 129, "tag '%s' is not valid" % ("t" * 129)),
    ("docker://a@sha256:abc", "digest 'sha256:abc' is not valid"),
    ("docker://a@md5:" + "0" * 32, "digest 'md5:%s' is not valid" % ("0" * 32)),
    ("docker://bad_host.com/x", "registry host 'bad_host.com' is not valid"),
    ("docker://" + "a" * 256, "the repository name is longer than 255 characters"),
    ("/srv/x.sif\n", "contains whitespace or control characters"),
    ("/srv/x\x00.sif", "contains whitespace or control characters"),
    ("/srv/x\u200b.sif", "contains whitespace or control characters"),
    ("/srv/x\t.sif", "contains whitespace or control characters"),
    ("/" + "a" * 5000 + ".sif", "longer than 4096 characters"),
])
def test_rejected_with_reason(text, fragment):
    with pytest.raises(ImageRefError) as e:
        parse_image_ref(text)
    assert fragment in str(e.value)
    assert ACCEPTED_FORMS in str(e.value)
    assert e.value.ref in (text, text[:80] + "...")
    assert e.value.code == "invalid_image_ref"


def test_error_message_names_the_reference_quoted():
    with pytest.raises(ImageRefError) as e:
        parse_image_ref("docker://a\nb")
    assert str(e.value).startswith("invalid image reference 'docker://a\\nb': ")
    assert "\n" not in str(e.value)


def test_non_string_is_rejected():
    with pytest.raises(ImageRefError, match="an image reference is a string"):
        parse_image_ref(None)


@pytest.mark.parametrize("text, path, tag", [
    ("oci:/l", Path("/l"), None),
    ("oci:/l:v1", Path("/l"), "v1"),
    ("docker-archive:/a/b.tar", Path("/a/b.tar"), None),
    ("/a/b.sif", Path("/a/b.sif"), None),
])
def test_path_and_tag(text, path, tag):
    ref = parse_image_ref(text)
    assert (ref.path, ref.tag) == (path, tag)


def test_docker_ref_has_no_path():
    with pytest.raises(ValueError, match="is a registry reference, not a path"):
        parse_image_ref("docker://python").path


def test_image_ref_is_frozen():
    ref = parse_image_ref("/a/b.sif")
    with pytest.raises(AttributeError):
        ref.location = "/etc/shadow"


@pytest.mark.parametrize("argv, returncode, stdout, stderr, expected", [
    (["apptainer", "build", "/c/x.sif", "docker-archive:/a b.tar"], 255, "out",
     "INFO:    Starting build...\nFATAL:   While performing build: unexpected EOF\n",
     "`apptainer build /c/x.sif 'docker-archive:/a b.tar'` exited 255: "
     "FATAL:   While performing build: unexpected EOF"),
    (["skopeo", "copy"], None, "", "", "`skopeo copy` timed out"),
    (["x"], 1, "", "  \n", "`x` exited 1"),
    (["x", "$(id)"], 1, "line1\nlast out\n", "", "`x '$(id)'` exited 1: last out"),
])
def test_image_build_error_message(argv, returncode, stdout, stderr, expected):
    e = ImageBuildError(argv, returncode, stdout, stderr)
    assert str(e) == expected
    assert (e.argv, e.returncode, e.stdout, e.stderr) == (argv, returncode, stdout, stderr)
    assert isinstance(e, ContainerError) and e.code == "image_build_failed"


def test_image_build_error_adds_hint():
    e = ImageBuildError(["b"], 2, "", "FATAL: x\n", hint="is it installed?")
    assert str(e) == "`b` exited 2: FATAL: x (is it installed?)"


@pytest.mark.parametrize("text, absolute", [
    # relative paths, resolved in the caller's folder (the command line)
    ("containers/definitions/tensorflow.def", "/work/co/containers/definitions/tensorflow.def"),
    ("./x.sif", "/work/co/x.sif"),
    ("../other/x.def", "/work/other/x.def"),
    ("docker-archive:img/py.tar", "docker-archive:/work/co/img/py.tar"),
    ("oci-archive:./py-oci.tar", "oci-archive:/work/co/py-oci.tar"),
    ("oci:layout:v1", "oci:/work/co/layout:v1"),
    # absolute, or not a path: as given, for parse_image_ref to judge
    ("/srv/x.def", "/srv/x.def"), ("/srv/../x.def", "/srv/../x.def"),
    ("docker-archive:/srv/py.tar", "docker-archive:/srv/py.tar"),
    ("docker://python:3.11", "docker://python:3.11"), ("python:3.11", "python:3.11"),
    ("x.tar", "x.tar"), ("docker-archive:", "docker-archive:"), ("", ""),
])
def test_absolute_ref(text, absolute):
    assert absolute_ref(text, "/work/co") == absolute
