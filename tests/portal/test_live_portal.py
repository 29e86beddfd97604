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
