"""The portal that `make run` starts on 127.0.0.1:8000 (gunicorn, from the Ansible role)."""
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
URL = "http://127.0.0.1:8000"
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
    """One address: nginx on :8000 passes /service/ to `aiportal router`, the rest to gunicorn
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
    """Deploy the toy model on the installed portal as alice and call it on :8000/service/NAME
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
