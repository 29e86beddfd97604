"""containers.build: tags, argv, context members and links (pure)."""
from __future__ import annotations

import pytest

from containers.build import (BuildContextError, Limits, Storage, bud_argv, check_dockerfile_path, check_member,
                              link_stays_inside, parse_build_tag, push_argv, storage_dir, wipe_argv)
from containers.errors import ImageRefError


@pytest.mark.parametrize("text, name", [
    ("localhost:5000/alice/app:v1", "localhost:5000/alice/app:v1"),
    ("docker://localhost:5000/alice/app:v1", "localhost:5000/alice/app:v1"),
    ("localhost:5000/alice/app", "localhost:5000/alice/app:latest"),
    ("registry.example.org/team/x/y:1.0", "registry.example.org/team/x/y:1.0"),
])
def test_tags(text, name):
    assert parse_build_tag(text).name == name


@pytest.mark.parametrize("text, why", [
    ("alice/app:v1", "name the registry"), ("localhost:5000/alice/app@sha256:" + "a" * 64, "not a digest"),
    ("localhost:5000/Alice/app", "lowercase"), ("", "empty"), ("localhost:5000/a b", "whitespace"),
])
def test_bad_tags(text, why):
    with pytest.raises(ImageRefError, match=why):
        parse_build_tag(text)


def test_argv():
    s = Storage("/var/tmp/aiportal-build-alice")
    t = parse_build_tag("h:5000/alice/app:1")
    assert bud_argv(s, "/b/context/Dockerfile", t, "/b/context", "/b/auth.json", ("h:5000",), Limits(10, 20, 30)) == [
        "prlimit", "--nproc=10:10", "--fsize=20:20", "--",
        "buildah", "--storage-driver", "overlay", "--root", s.root, "--runroot", s.runroot, "bud", "--isolation", "chroot",
        "--authfile", "/b/auth.json", "--tls-verify=false", "-f", "/b/context/Dockerfile", "-t", "h:5000/alice/app:1",
        "/b/context"]
    assert push_argv(s, t, "/b/auth.json", "/b/digest", ()) == [
        "buildah", "--storage-driver", "overlay", "--root", s.root, "--runroot", s.runroot, "push", "--authfile",
        "/b/auth.json", "--digestfile", "/b/digest", "h:5000/alice/app:1", "docker://h:5000/alice/app:1"]
    assert t.pinned("sha256:ab") == "h:5000/alice/app@sha256:ab"


def test_storage_drivers_have_stores_of_their_own():
    assert Storage("/s").root == "/s/root-overlay"
    assert Storage("/s", "vfs").root == "/s/root"          # where vfs builds have always been
    assert bud_argv(Storage("/s", "vfs"), "/c/D", parse_build_tag("h:1/a/b:1"), "/c", "/a")[:3] == [
        "buildah", "--storage-driver", "vfs"]
    with pytest.raises(ValueError, match="overlay, vfs"):
        Storage("/s", "btrfs")
    assert wipe_argv(Storage("/s"))[-4:] == ["/s/root-overlay", "/s/root", "/s/runroot", "/s/tmp"]


@pytest.mark.parametrize("template, user, ok", [
    ("/var/tmp/aiportal-build-{user}", "alice", "/var/tmp/aiportal-build-alice"),
    ("/var/tmp/aiportal-build-{user}", "root", None), ("/var/tmp/aiportal-build-{user}", "../x", None),
    ("/var/tmp/shared", "alice", None), ("relative/{user}", "alice", None),
])
def test_storage_dir(template, user, ok):
    if ok is None:
        with pytest.raises(ValueError):
            storage_dir(template, user)
    else:
        assert storage_dir(template, user) == ok


@pytest.mark.parametrize("name, kind, link, ok", [
    ("code/a.py", "file", "", "code/a.py"), ("./code/", "dir", "", "code"), (".", "dir", "", "."),
    ("lib/l", "symlink", "../code/a.py", "lib/l"), ("h", "hardlink", "code/a.py", "h"),
    ("/etc/passwd", "file", "", None), ("../x", "file", "", None), ("a/../../x", "file", "", None),
    ("dev/sda", "device", "", None), ("p", "fifo", "", None), ("l", "symlink", "/etc/passwd", None),
    ("a/l", "symlink", "../../etc", None), ("h", "hardlink", "/etc/shadow", None), ("h", "hardlink", "../x", None),
])
def test_members(name, kind, link, ok):
    if ok is None:
        with pytest.raises(BuildContextError):
            check_member(name, kind, link)
    else:
        assert check_member(name, kind, link) == ok


@pytest.mark.parametrize("links, path, inside", [
    ({"l": "code/a.py"}, "l", True), ({"a/l": "../b"}, "a/l", True),
    ({"t": ".", "s": "t/../x"}, "s", False),            # textually "x", really "../x"
    ({"t": "a/b", "s": "t/../.."}, "s", True),           # a/b/../.. is the top
    ({"t": "a", "s": "t/../.."}, "s", False),
    ({"x": "y", "y": "x"}, "x", False),                   # a loop
])
def test_links(links, path, inside):
    assert link_stays_inside(links, path) is inside


@pytest.mark.parametrize("text, ok", [("Dockerfile", "Dockerfile"), ("", "Dockerfile"), ("d/Dockerfile.gpu", "d/Dockerfile.gpu"),
                                      ("/etc/Dockerfile", None), ("../Dockerfile", None), (".", None)])
def test_dockerfile_path(text, ok):
    if ok is None:
        with pytest.raises(BuildContextError):
            check_dockerfile_path(text)
    else:
        assert check_dockerfile_path(text) == ok
