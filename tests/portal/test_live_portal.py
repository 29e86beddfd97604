"""The portal that `make run` starts behind nginx on https://127.0.0.1:8443 (plain HTTP on
127.0.0.1:8000 only redirects there), from the Ansible role."""
import http.cookiejar
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.portal, pytest.mark.slurm]
URL = "https://127.0.0.1:8443"
PLAIN = "http://127.0.0.1:8000"
NODES = {"g1n1": 1, "g1n2": 1, "g4n1": 4, "g4n2": 4, "inf1": 1}


def get(path, token=None):
    req = urllib.request.Request(URL + path)
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=20) as resp:
        return resp.read()


def test_cluster_api_lists_the_five_nodes_with_their_gpus(admin_token):
    body = json.loads(get("/api/v1/cluster", admin_token))
    assert {n["name"]: n["gpus"] for n in body["nodes"]} == NODES
    assert body["gpus"] == 11
    parts = {p["name"]: p for p in body["partitions"]}
    assert set(parts) == {"gpu-1card", "gpu-4card", "infer"}
    assert parts["gpu-1card"]["default"] is True
    assert parts["infer"]["max_time"] == "infinite"


def test_cluster_api_without_token_is_401():
    with pytest.raises(urllib.error.HTTPError) as err:
        get("/api/v1/cluster")
    assert err.value.code == 401
    err.value.close()


def test_cluster_page_after_login_as_admin(admin_token):
    """The installed portal: the admin logs in with the bootstrap token as password."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(URL + "/login", timeout=20) as resp:
        form = resp.read().decode()
    token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    data = urllib.parse.urlencode({"name": "admin", "password": admin_token, "csrf": token}).encode()
    with opener.open(URL + "/login?next=/cluster", data=data, timeout=20) as resp:
        page = resp.read().decode()
    for name in NODES:
        assert name in page
    assert "of 11 GPUs in use" in page


def test_dev_accounts_log_in_with_their_generated_passwords():
    for user in ("alice", "bob"):
        password = (Path("/etc/aiportal/secrets") / ("portal_password_" + user)).read_text().strip()
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(URL + "/login", timeout=20) as resp:
            token = re.search(r'name="csrf" value="([^"]+)"', resp.read().decode()).group(1)
        data = urllib.parse.urlencode({"name": user, "password": password, "csrf": token}).encode()
        with opener.open(URL + "/login", data=data, timeout=20) as resp:
            assert resp.geturl().endswith("/") and "Log out" in resp.read().decode()


def test_reconciler_runs_beside_the_portal():
    pid = int(Path("/run/aiportal/reconcile.pid").read_text())
    cmd = Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
    assert any(part.endswith(b"aiportal") for part in cmd) and b"reconcile" in cmd


def test_portal_config_holds_secrets_for_root_only():
    assert os.stat("/etc/aiportal/portal.toml").st_mode & 0o777 == 0o600
    assert os.stat("/etc/aiportal/secrets").st_mode & 0o777 == 0o700


def _runs(pidfile: str, program: bytes) -> bool:
    pid = int(Path(pidfile).read_text().split()[0])
    cmd = Path("/proc/%d/cmdline" % pid).read_bytes().replace(b"\0", b" ")
    return program in cmd


def test_nginx_is_the_front_door_for_the_portal_and_the_router(admin_token):
    """One address: nginx on :8443 passes /service/ to `aiportal router`, the rest to gunicorn
    (both on unix sockets, so neither is reachable around nginx)."""
    assert _runs("/run/aiportal/nginx.pid", b"nginx") and _runs("/run/aiportal/router.pid", b"router")
    assert Path("/run/aiportal/front/portal.sock").is_socket() and Path("/run/aiportal/front/router.sock").is_socket()
    front = os.stat("/run/aiportal/front")
    assert front.st_mode & 0o777 == 0o750 and front.st_uid == 0        # root and nginx's workers only
    with urllib.request.urlopen(URL + "/healthz", timeout=10) as resp:
        assert resp.read() and "nginx/" not in resp.headers.get("Server", "")     # no version shown
    req = urllib.request.Request(URL + "/service/no-such-service", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401 and "Bearer" in err.value.headers["WWW-Authenticate"]
    assert json.loads(err.value.read())["error"] == "unauthorized"       # the router's answer
    req.add_header("Authorization", "Bearer " + admin_token)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404 and json.loads(err.value.read())["error"] == "unknown_service"


def test_a_service_answers_through_the_front_door(base_image, tmp_path):
    """Deploy the toy model on the installed portal as alice and call it on :8443/service/NAME
    with curl, as a user would."""
    import pwd
    import shutil
    import subprocess
    import time
    import uuid
    from tests.conftest import SHARED_ROOT
    from tests.inference.conftest import TOY
    token = subprocess.run(["/usr/local/bin/aiportal", "token", "create", "--user", "alice", "--name", "live-test",
                            "--expires-days", "1"], capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    name = "live-%s" % uuid.uuid4().hex[:6]
    model = SHARED_ROOT / "users" / "alice" / name
    shutil.copytree(TOY, model, ignore=shutil.ignore_patterns("__pycache__"))
    pw = pwd.getpwnam("alice")
    for p in [model, *model.iterdir()]:
        os.chown(p, pw.pw_uid, pw.pw_gid)

    def api(method, path, body=None):
        req = urllib.request.Request(URL + "/api/v1" + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    api("POST", "/services", {"name": name, "image": str(base_image), "model": str(model)})
    try:
        deadline = time.monotonic() + 120
        while api("GET", "/services/" + name)["ready_replicas"] < 1:
            assert time.monotonic() < deadline, api("GET", "/services/" + name)
            time.sleep(0.5)
        time.sleep(1)           # the router re-reads the table every router_refresh_s
        (tmp_path / "in.txt").write_text("through nginx")
        out = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Authorization: Bearer " + token, "-T",
                              str(tmp_path / "in.txt"), URL + "/service/" + name],
                             capture_output=True, text=True, timeout=30)
        assert json.loads(out.stdout)["upper"] == "THROUGH NGINX", (out.stdout, out.stderr)
    finally:
        api("DELETE", "/services/" + name)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                api("GET", "/services/" + name)
            except urllib.error.HTTPError as e:
                e.close()
                break
            time.sleep(0.5)
        shutil.rmtree(model, ignore_errors=True)
        for line in subprocess.run(["/usr/local/bin/aiportal", "token", "list", "--user", "alice"],
                                   capture_output=True, text=True, timeout=60).stdout.splitlines():
            if "live-test" in line:
                subprocess.run(["/usr/local/bin/aiportal", "token", "revoke", line.split()[0], "--user", "alice"],
                               capture_output=True, timeout=60)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.parametrize("method, path", [("GET", "/jobs?state=RUNNING&page=2"), ("POST", "/api/v1/jobs"),
                                          ("POST", "/service/toy"), ("GET", "/")])
def test_plain_http_only_redirects_to_https_with_the_same_path(method, path):
    """Port 8000 serves nothing itself: 308 (the same method and body) to the same path on 8443."""
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(PLAIN + path, data=b"{}" if method == "POST" else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(req, timeout=10)
    with err.value:
        assert err.value.code == 308
        assert err.value.headers["Location"] == URL + path
        assert "Set-Cookie" not in err.value.headers


def test_the_front_door_certificate_is_the_dev_cas_and_verifies_by_name():
    """The system trust store (where provisioning put the dev CA) vouches for the portal by its
    address and by localhost; the certificate is not the registry's; a CA that did not sign it
    does not."""
    import socket
    import ssl
    for host in ("127.0.0.1", "localhost"):
        ctx = ssl.create_default_context()
        with socket.create_connection(("127.0.0.1", 8443), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            cert = tls.getpeercert()
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"] and ("DNS", "localhost") in cert["subjectAltName"]
        assert dict(x[0] for x in cert["issuer"])["commonName"].startswith("aiportal dev CA")
    served = ssl.get_server_certificate(("127.0.0.1", 8443))
    assert served.strip() == Path("/etc/aiportal/tls/portal.crt").read_text().strip()
    assert served.strip() != Path("/etc/aiportal/registry/tls.crt").read_text().strip()
    key = os.stat("/etc/aiportal/tls/portal.key")
    assert key.st_uid == 0 and key.st_mode & 0o077 in (0, 0o040) and os.stat("/etc/aiportal/tls").st_mode & 0o777 == 0o700

    other = ssl.create_default_context(cafile="/etc/aiportal/registry/tls.crt")   # not a CA at all
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", 8443), timeout=10) as raw:
            other.wrap_socket(raw, server_hostname="127.0.0.1").close()
    # TLS 1.1 and older: refused by the server (openssl as a client that would speak it)
    import subprocess
    old = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:8443", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                         input="", capture_output=True, text=True, timeout=30)
    assert old.returncode != 0 and "alert protocol version" in old.stdout + old.stderr, (old.stdout, old.stderr)


def test_https_answers_carry_hsts_and_the_session_cookie_is_secure():
    """Over HTTPS every answer (an error too) says Strict-Transport-Security, and the session
    cookie is Secure (never sent over the plain port) and HttpOnly."""
    with urllib.request.urlopen(URL + "/login", timeout=10) as resp:
        assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
        cookie = resp.headers["Set-Cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert {"secure", "httponly"} <= attrs, cookie
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(URL + "/api/v1/cluster", timeout=10)
    with err.value:
        assert err.value.code == 401 and err.value.headers["Strict-Transport-Security"].startswith("max-age=")
