"""containers.registry against a real registry (distribution on loopback, tests/registries.py),
plus the answers a real one gives rarely (500, a token service) from a small loopback server."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from containers.builder import ApptainerBuilder
from containers.errors import ImageRefError
from containers.refs import parse_image_ref
from containers.registry import (RegistryAuth, RegistryAuthError, RegistryClient, RegistryConfig, RegistryError,
                                 RegistryNotFound, RegistryUnavailable, authfile_document, check_host,
                                 check_repository, read_authfile, write_authfile)
from tests.conftest import free_port
from tests.registries import PASSWORDS, SITE, registry  # noqa: F401 (fixture)


def client(reg, user="alice", password=None):
    auth = RegistryAuth(user, PASSWORDS.get(user, SITE[1]) if password is None else password) if user else None
    return RegistryClient(reg.host, auth, RegistryConfig(insecure=frozenset({reg.host}), timeout=5))


def skopeo_digest(reg, ref: str) -> str:
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--creds", "%s:%s" % SITE,
                          "--format", "{{.Digest}}", "docker://%s/%s" % (reg.host, ref)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.strip()


# -- a real registry ----------------------------------------------------------------------------

def test_an_account_is_checked_at_once(registry):
    client(registry).check_login()
    with pytest.raises(RegistryAuthError, match="refused the account 'alice'"):
        client(registry, password="wrong").check_login()
    with pytest.raises(RegistryAuthError, match="aiportal registry login %s" % registry.host):
        client(registry, user=None).check_login()


def test_a_tag_resolves_to_the_digest_skopeo_sees(registry):
    digest = client(registry).resolve("site/base", "1")
    assert digest == skopeo_digest(registry, "site/base:1")
    assert client(registry).resolve("site/base", digest) == digest
    assert client(registry).manifest_readable("site/base", digest)


def test_missing_tags_and_repositories_are_not_found(registry):
    with pytest.raises(RegistryNotFound, match="site/base:nope does not exist"):
        client(registry).resolve("site/base", "nope")
    with pytest.raises(RegistryNotFound):
        client(registry).resolve("nobody/nothing", "1")
    assert not client(registry).manifest_readable("site/base", "sha256:" + "0" * 64)
    assert not client(registry, password="wrong").manifest_readable("site/base", "sha256:" + "0" * 64)


def test_catalog_and_tags(registry):
    assert "site/base" in client(registry).catalog()
    assert client(registry).tags("site/base") == ["1"]


@pytest.mark.parametrize("repo", ["../etc", "Site/base", "site//base", "site/base?n=1", "a" * 300, ""])
def test_hostile_repository_names_never_reach_the_registry(registry, repo):
    with pytest.raises(ValueError):
        client(registry).resolve(repo, "1")


@pytest.mark.parametrize("tag", ["a b", "../x", "-x", "x" * 129, "sha256:abc", ""])
def test_hostile_tags_never_reach_the_registry(registry, tag):
    with pytest.raises(ValueError):
        client(registry).resolve("site/base", tag)


def test_a_registry_that_is_down_is_unavailable():
    port = free_port(range(9170, 9180))
    c = RegistryClient("127.0.0.1:%d" % port, RegistryAuth("a", "b"), RegistryConfig(insecure=frozenset({"127.0.0.1:%d" % port}), timeout=2))
    with pytest.raises(RegistryUnavailable, match="cannot be reached"):
        c.check_login()


def test_https_is_verified_unless_the_host_is_declared_insecure(registry):
    c = RegistryClient(registry.host, RegistryAuth("alice", PASSWORDS["alice"]), RegistryConfig(timeout=5))
    with pytest.raises(RegistryUnavailable, match="https://%s" % registry.host):
        c.check_login()        # the test registry speaks plain HTTP: TLS fails, nothing is sent in clear


def test_the_authfile_is_private_new_and_read_by_skopeo(registry, tmp_path):
    path = tmp_path / "auth.json"
    write_authfile(path, {registry.host: RegistryAuth("alice", PASSWORDS["alice"])})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_authfile(path) == {registry.host: RegistryAuth("alice", PASSWORDS["alice"])}
    with pytest.raises(FileExistsError):
        write_authfile(path, {registry.host: RegistryAuth("alice", "x")})
    link = tmp_path / "link.json"
    os.symlink(tmp_path / "elsewhere", link)
    with pytest.raises(OSError):
        write_authfile(link, {registry.host: RegistryAuth("alice", "x")})
    assert not (tmp_path / "elsewhere").exists()
    res = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--authfile", str(path), "--format",
                          "{{.Digest}}", "docker://%s/site/base:1" % registry.host],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == skopeo_digest(registry, "site/base:1")
    assert "alice-registry-pw" not in repr(RegistryAuth("alice", PASSWORDS["alice"]))


def test_a_pinned_image_is_pulled_into_a_sif(registry, tmp_path):
    digest = client(registry).resolve("site/base", "1")
    auth = tmp_path / "auth.json"
    write_authfile(auth, {registry.host: RegistryAuth("alice", PASSWORDS["alice"])})
    ref = parse_image_ref("docker://%s/site/base@%s" % (registry.host, digest))
    dest = tmp_path / "base.sif"
    ApptainerBuilder(tmp_path / "cache", tmp_path, timeout=300, authfile=auth,
                     insecure=frozenset({registry.host}))(ref, dest)
    out = subprocess.run(["apptainer", "exec", str(dest), "/bin/busybox", "echo", "pulled"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "pulled", out.stderr
    with pytest.raises(ImageRefError, match="only pinned"):
        ApptainerBuilder(tmp_path / "cache", tmp_path)(parse_image_ref("docker://%s/site/base:1" % registry.host),
                                                      tmp_path / "x.sif")


# -- answers a real registry gives rarely: a loopback server ------------------------------------

class _Fake(BaseHTTPRequestHandler):
    routes: dict = {}
    seen: list = []

    def do_GET(self):          # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        for prefix, answer in self.routes.items():
            if self.path.startswith(prefix):
                code, headers, body = answer(self)
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    port = free_port(range(9170, 9180))
    server = ThreadingHTTPServer(("127.0.0.1", port), _Fake)
    _Fake.routes, _Fake.seen = {}, []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield "127.0.0.1:%d" % port
    finally:
        server.shutdown()
        server.server_close()


def test_server_errors_are_unavailable_not_not_found(fake):
    _Fake.routes = {"/v2/": lambda h: (500, {}, b"boom")}
    c = RegistryClient(fake, RegistryAuth("u", "p"), RegistryConfig(insecure=frozenset({fake}), timeout=5))
    with pytest.raises(RegistryUnavailable, match="answered 500"):
        c.resolve("a/b", "1")


def test_the_token_flow_sends_the_account_to_the_token_service_only(fake):
    digest = "sha256:" + "ab" * 32

    def manifest(h):
        if h.headers.get("Authorization") != "Bearer T0K":
            return 401, {"WWW-Authenticate": 'Bearer realm="http://%s/token",service="reg",scope="x"' % fake}, b""
        return 200, {"Docker-Content-Digest": digest}, b"{}"

    _Fake.routes = {"/token": lambda h: (200, {}, json.dumps({"token": "T0K"}).encode()), "/v2/": manifest}
    c = RegistryClient(fake, RegistryAuth("u", "p"), RegistryConfig(insecure=frozenset({fake}), timeout=5))
    assert c.resolve("a/b", "1") == digest
    token_calls = [(p, a) for p, a in _Fake.seen if p.startswith("/token")]
    assert token_calls and token_calls[0][1].startswith("Basic ")
    assert "scope=repository%3Aa%2Fb%3Apull" in token_calls[0][0]
    assert all(not a.startswith("Basic") for p, a in _Fake.seen if p.startswith("/v2/a/b/manifests") and a)


def test_a_digest_that_does_not_match_is_refused(fake):
    _Fake.routes = {"/v2/": lambda h: (200, {"Docker-Content-Digest": "sha256:" + "cd" * 32}, b"{}")}
    c = RegistryClient(fake, None, RegistryConfig(insecure=frozenset({fake}), timeout=5))
    with pytest.raises(RegistryError, match="got a manifest with digest"):
        c.resolve("a/b", "sha256:" + "ab" * 32)


def test_redirects_are_not_followed(fake):
    _Fake.routes = {"/v2/": lambda h: (307, {"Location": "http://example.invalid/x"}, b"")}
    c = RegistryClient(fake, RegistryAuth("u", "p"), RegistryConfig(insecure=frozenset({fake}), timeout=5))
    with pytest.raises(RegistryError, match="not followed"):
        c.check_login()


# -- pure -----------------------------------------------------------------------------------------

def test_hosts_and_repositories():
    assert check_host("localhost:5000") == "localhost:5000"
    assert check_repository("alice/cifar-10") == "alice/cifar-10"
    for bad in ("", "a b", "http://x", "x/y", "a:b:c"):
        with pytest.raises(ValueError):
            check_host(bad)
    assert authfile_document({"h:1": RegistryAuth("u", "p:q")}) == {"auths": {"h:1": {"auth": "dTpwOnE="}}}


def test_docker_references_know_their_parts():
    r = parse_image_ref("docker://localhost:5000/alice/cifar:v1")
    assert (r.registry, r.repository, r.tag, r.digest, r.reference) == ("localhost:5000", "alice/cifar", "v1", None, "v1")
    d = "sha256:" + "1" * 64
    assert str(r.pinned(d)) == "docker://localhost:5000/alice/cifar@" + d
    hub = parse_image_ref("docker://python")
    assert (hub.registry, hub.repository, hub.reference) == ("docker.io", "library/python", "latest")
    assert str(hub.pinned(d)) == "docker://docker.io/library/python@" + d
    both = parse_image_ref("docker://localhost:5000/a/b:1@" + d)
    assert (both.tag, both.digest, both.reference) == ("1", d, d)
