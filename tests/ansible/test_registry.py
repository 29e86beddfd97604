"""The registry role on the provisioned dev machine (`make provision`): distribution on
https://localhost:5000 behind the dev CA in the system trust store (so Python's default SSL
context, skopeo, buildah and apptainer verify it with no flags), bcrypt-only htpasswd accounts
for alice, bob and the site account, their password files, the subordinate id ranges rootless
builds need, and a second run that changes nothing. Throwaway repositories are named
``test-<random>/x`` and deleted through the registry's API."""
from __future__ import annotations

import base64
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.ansible.test_playbooks import ansible_playbook
from tests.conftest import ETC, REPO, run

sys.path.insert(0, str(REPO / "ansible" / "filter_plugins"))
from aiportal_subids import parse_subids  # noqa: E402

pytestmark = pytest.mark.registry

HOST = "localhost:5000"
URL = "https://%s" % HOST
SECRETS = ETC / "secrets"
CONF = ETC / "registry"
STORAGE = Path("/var/lib/aiportal/registry")
PIDFILE = Path("/run/aiportal/registry.pid")
USERS = ("alice", "bob")
SITE_ACCOUNT = "aiportal-site"
MANIFEST_TYPES = ", ".join(("application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.v2+json"))


def password(name: str) -> str:
    return (SECRETS / ("registry_password_%s" % name)).read_text().strip()


def call(path: str, user: str | None = None, pw: str | None = None, method: str = "GET",
         accept: str | None = None):
    """(status, headers, body) of one request, over TLS verified by Python's default context."""
    req = urllib.request.Request(URL + path, method=method)
    if user is not None:
        token = base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()
        req.add_header("Authorization", "Basic " + token)
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=10) as res:       # no context: the default one
            return res.status, res.headers, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module", autouse=True)
def registry_up():
    try:
        socket.create_connection(("127.0.0.1", 5000), timeout=2).close()
    except OSError as e:
        pytest.fail("nothing answers on 127.0.0.1:5000 (%s): run `make provision` (role registry)" % e)


def authfile(tmp: Path, user: str) -> Path:
    """A containers auth.json for ``user`` (0600): the password never goes on a command line."""
    path = tmp / ("auth-%s.json" % user)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        token = base64.b64encode(("%s:%s" % (user, password(user))).encode()).decode()
        json.dump({"auths": {HOST: {"auth": token}}}, f)
    return path


def push_tiny_image(tmp: Path, auth: Path) -> str:
    """An OCI layout with busybox in one layer (umoci), copied to a throwaway repository with
    skopeo; returns the repository name."""
    layout = tmp / "oci"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", "%s:x" % layout])
    run(["umoci", "insert", "--image", "%s:x" % layout, "/bin/busybox", "/bin/busybox"])
    run(["umoci", "config", "--image", "%s:x" % layout, "--config.cmd", "/bin/busybox"])
    repo = "test-%s/x" % uuid.uuid4().hex[:10]
    run(["skopeo", "copy", "--quiet", "--dest-authfile", str(auth), "oci:%s:x" % layout,
         "docker://%s/%s:1" % (HOST, repo)], timeout=120)
    return repo


def delete_repository(repo: str, user: str = "alice") -> None:
    """Delete the tag's manifest and its blobs through the API; then the repository's empty
    folder, which distribution has no API for."""
    pw = password(user)
    status, headers, body = call("/v2/%s/manifests/1" % repo, user, pw, accept=MANIFEST_TYPES)
    if status == 200:
        manifest = json.loads(body)
        digest = headers["Docker-Content-Digest"]
        status, _, _ = call("/v2/%s/manifests/%s" % (repo, digest), user, pw, method="DELETE")
        assert status == 202, status
        for blob in [manifest["config"]] + manifest["layers"]:
            status, _, _ = call("/v2/%s/blobs/%s" % (repo, blob["digest"]), user, pw, method="DELETE")
            assert status in (202, 404), status
    shutil.rmtree(STORAGE / "docker/registry/v2/repositories" / repo.split("/")[0], ignore_errors=True)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    auth = authfile(tmp, "alice")
    repo = push_tiny_image(tmp, auth)
    try:
        yield tmp, auth, repo
    finally:
        delete_repository(repo)


# -- HTTPS and accounts ----------------------------------------------------------------------

def test_anonymous_requests_are_refused():
    status, headers, _ = call("/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="aiportal"'


@pytest.mark.parametrize("user", USERS + (SITE_ACCOUNT,))
def test_each_account_logs_in_over_verified_tls(user):
    status, headers, _ = call("/v2/", user, password(user))
    assert status == 200
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"


@pytest.mark.parametrize("user, pw", [
    ("alice", "wrong"),
    ("alice", None),            # bob's password is not alice's
    ("mallory", "x"),
    ("alice", ""),
])
def test_wrong_credentials_are_refused(user, pw):
    status, _, _ = call("/v2/", user, password("bob") if pw is None else pw)
    assert status == 401


def test_the_certificate_chains_to_the_dev_ca_in_the_system_store():
    assert Path("/usr/local/share/ca-certificates/aiportal-dev-ca.crt").read_text() == (ETC / "ca/ca.crt").read_text()
    assert Path("/etc/ssl/certs/aiportal-dev-ca.pem").exists()
    ctx = ssl.create_default_context()
    for host, server_name in (("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1")):
        with socket.create_connection((host, 5000), timeout=5) as sock, \
                ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            cert = tls.getpeercert()
        issuer = dict(item[0] for item in cert["issuer"])
        assert issuer["commonName"].startswith("aiportal dev CA"), issuer
        assert ("DNS", "localhost") in cert["subjectAltName"]
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]


def test_the_dev_ca_signs_for_the_registry_names_only():
    text = run(["openssl", "x509", "-noout", "-text", "-in", str(ETC / "ca/ca.crt")])
    assert "X509v3 Name Constraints: critical" in text
    assert re.search(r"Permitted:\s+DNS:localhost\s+IP:127\.0\.0\.1/255\.255\.255\.255", text), text


def test_it_listens_on_loopback_only():
    listeners = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local.endswith(":%04X" % 5000):
                listeners.append(local)
    assert listeners == ["0100007F:1388"]


# -- images: push, inspect and pull with no TLS flags -----------------------------------------

def test_skopeo_inspects_a_pushed_image_without_tls_flags(pushed):
    tmp, auth, repo = pushed
    info = json.loads(run(["skopeo", "inspect", "--authfile", str(auth), "docker://%s/%s:1" % (HOST, repo)]))
    assert info["Name"] == "%s/%s" % (HOST, repo)
    assert info["RepoTags"] == ["1"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", info["Digest"])
    anonymous = subprocess.run(["skopeo", "inspect", "--authfile", str(tmp / "none.json"),
                                "docker://%s/%s:1" % (HOST, repo)], capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    assert "authentication required" in anonymous.stderr


def test_every_account_reaches_every_repository(pushed):
    """distribution 2.8's htpasswd auth has no per-repository rights (docs/provisioning.md):
    bob reads alice's repository. This pins the documented limit."""
    _, _, repo = pushed
    status, _, _ = call("/v2/%s/manifests/1" % repo, "bob", password("bob"), method="HEAD", accept=MANIFEST_TYPES)
    assert status == 200


def test_buildah_pulls_without_tls_flags(pushed):
    tmp, auth, repo = pushed
    store = tmp / "buildah"
    out = run(["buildah", "--storage-driver", "vfs", "--root", str(store / "root"), "--runroot", str(store / "run"),
               "pull", "--quiet", "--authfile", str(auth), "%s/%s:1" % (HOST, repo)], timeout=120)
    assert re.fullmatch(r"[0-9a-f]{64}", out.strip())


@pytest.mark.apptainer
def test_apptainer_pulls_without_tls_flags(pushed):
    tmp, auth, repo = pushed
    sif = tmp / "x.sif"
    run(["apptainer", "pull", "--authfile", str(auth), str(sif), "docker://%s/%s:1" % (HOST, repo)],
        timeout=180, cwd=tmp)
    assert sif.stat().st_size > 0


def test_a_repository_is_deleted_through_the_api(tmp_path):
    auth = authfile(tmp_path, "bob")
    repo = push_tiny_image(tmp_path, auth)
    pw = password("bob")
    assert call("/v2/%s/manifests/1" % repo, "bob", pw, method="HEAD", accept=MANIFEST_TYPES)[0] == 200
    delete_repository(repo, "bob")
    assert call("/v2/%s/manifests/1" % repo, "bob", pw, method="HEAD", accept=MANIFEST_TYPES)[0] == 404


# -- files and modes --------------------------------------------------------------------------

def mode_owner(path: Path):
    st = path.stat()
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name


@pytest.mark.parametrize("name", USERS + (SITE_ACCOUNT,))
def test_password_files_are_root_only(name):
    path = SECRETS / ("registry_password_%s" % name)
    assert mode_owner(path) == (0o600, "root")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password(name))


@pytest.mark.parametrize("user", USERS)
def test_users_have_their_own_copy(user):
    folder = Path(pwd.getpwnam(user).pw_dir) / ".config" / "aiportal"
    assert mode_owner(folder) == (0o700, user)
    copy = folder / "registry_password"
    assert mode_owner(copy) == (0o600, user)
    assert copy.read_text().strip() == password(user)


def test_the_portal_finds_the_site_account_where_its_settings_say():
    # portal/settings.py: site_registry_password_file, site_registry
    assert Path("/etc/aiportal/secrets/registry_password_aiportal-site").is_file()
    assert 'site_registry = "localhost:5000"' in (ETC / "site.toml").read_text().splitlines()


def test_htpasswd_holds_bcrypt_entries_only():
    path = CONF / "htpasswd"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert re.fullmatch(r"[^:]+:\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}", line), line.split(":")[0]
    assert {line.split(":")[0] for line in lines} >= set(USERS + (SITE_ACCOUNT,))


@pytest.mark.parametrize("path, mode, owner", [
    (ETC / "ca/ca.key", 0o600, "root"),
    (ETC / "ca", 0o700, "root"),
    (CONF / "tls.key", 0o640, "root"),
    (CONF / "config.yml", 0o640, "root"),          # it holds the http secret
    (STORAGE, 0o700, "docker-registry"),
    (Path("/var/log/aiportal/registry.log"), 0o640, "root"),
])
def test_modes(path, mode, owner):
    assert mode_owner(path) == (mode, owner)


def test_the_daemon_runs_as_the_service_account():
    pid = int(PIDFILE.read_text().split()[0])
    assert os.stat("/proc/%d" % pid).st_uid == pwd.getpwnam("docker-registry").pw_uid
    assert Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")[:2] == [b"/usr/bin/docker-registry", b"serve"]


@pytest.mark.parametrize("path", ["/etc/subuid", "/etc/subgid"])
def test_builders_have_one_subordinate_range_each(path):
    ranges = parse_subids(Path(path).read_text())
    for user in USERS:
        assert len([r for r in ranges if r[0] == user]) == 1, (user, path)
    spans = sorted((start, start + count) for _, start, count in ranges)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "overlapping ranges in %s" % path


def test_make_down_stops_it():
    down = (REPO / "ansible/roles/common/tasks/down.yml").read_text()
    assert '{name: registry, program: docker-registry, pidfile: "{{ aiportal_run_dir }}/registry.pid"}' in down


@pytest.mark.ansible
def test_a_second_run_changes_nothing_and_keeps_the_daemon():
    pid = PIDFILE.read_text()
    res = ansible_playbook("-i", "inventories/dev", "site.yml", "--tags", "registry")
    assert res.returncode == 0, res.stdout[-4000:]
    recap = re.search(r"^dev\s+:\s+ok=\d+\s+changed=(\d+)", res.stdout, re.M)
    assert recap, res.stdout[-2000:]
    assert recap.group(1) == "0", "tasks that changed:\n%s" % "\n".join(
        re.findall(r"TASK \[(.+?)\] \*+\nchanged", res.stdout))
    assert re.search(r"TASK \[registry : Start the registry \(pid file\)\] \*+\nok: \[dev\]", res.stdout)
    assert PIDFILE.read_text() == pid
