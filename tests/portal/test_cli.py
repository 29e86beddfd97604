"""The `aiportal` CLI against the running portal."""
import json
import subprocess

import pytest

from tests.conftest import REPO

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")


def cli(*args, env=None):
    return subprocess.run([AIPORTAL, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.portal
@pytest.mark.slurm
def test_cluster_table_and_json():
    token = "/etc/aiportal/secrets/admin_token"
    table = cli("--token-file", token, "cluster")
    assert table.returncode == 0, table.stderr
    assert "of 11 GPUs in use" in table.stdout
    assert "gpu-1card*" in table.stdout
    raw = cli("--token-file", token, "cluster", "--json")
    assert {n["name"] for n in json.loads(raw.stdout)["nodes"]} == {"g1n1", "g1n2", "g4n1", "g4n2", "inf1"}


@pytest.mark.portal
def test_wrong_token_is_reported_with_the_api_error(tmp_path):
    bad = tmp_path / "token"
    bad.write_text("wrong")
    res = cli("--token-file", str(bad), "cluster")
    assert res.returncode == 2
    assert "answered 401 (unauthorized" in res.stderr


def test_missing_token_file_says_what_to_do(tmp_path):
    res = cli("--token-file", str(tmp_path / "none"), "cluster")
    assert res.returncode == 2
    assert "pass --token-file FILE or set AIPORTAL_TOKEN" in res.stderr


def test_unreachable_portal_says_so(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("x")
    res = cli("--url", "http://127.0.0.1:9199", "--token-file", str(tok), "cluster")
    assert res.returncode == 2
    assert "cannot reach the portal at http://127.0.0.1:9199" in res.stderr
