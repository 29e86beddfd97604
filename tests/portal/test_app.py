"""The Flask app through its test client: auth on every endpoint, CSRF, the cluster view."""
import hashlib
import re

import pytest
from cryptography.fernet import Fernet

from portal.app import create_app
from portal.settings import Settings

TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def app():
    settings = Settings.from_mapping({"secret_key": "s" * 64, "data_key": Fernet.generate_key().decode(),
                                      "admin_token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()})
    return create_app({"TESTING": True}, settings=settings)


@pytest.fixture
def client(app):
    return app.test_client()


def csrf(client, path="/login"):
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).get_data(as_text=True)).group(1)


def login(client, token=TOKEN):
    return client.post("/login", data={"token": token, "csrf": csrf(client)})


def test_healthz_is_open_and_says_nothing_else(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_data(as_text=True) == "ok\n"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + TOKEN},
                                     {"Authorization": "Bearer "}])
def test_api_requires_the_token(client, headers):
    r = client.get("/api/v1/cluster", headers=headers)
    assert r.status_code == 401
    assert r.get_json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_status_page_requires_login(client):
    r = client.get("/")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_login_without_csrf_is_refused(client):
    r = client.post("/login", data={"token": TOKEN})
    assert r.status_code == 400


def test_login_with_a_wrong_token_is_refused(client):
    r = login(client, "nope")
    assert r.status_code == 401 and "not valid" in r.get_data(as_text=True)
    assert client.get("/").status_code == 302


@pytest.mark.parametrize("nxt, where", [("/", "/"), ("//evil.example/x", "/"), ("https://evil.example", "/")])
def test_login_redirect_stays_on_the_portal(client, nxt, where):
    r = client.post("/login?next=%s" % nxt, data={"token": TOKEN, "csrf": csrf(client)})
    assert r.status_code == 302 and r.headers["Location"] == where


def test_logout_needs_csrf_and_ends_the_session(client):
    login(client)
    assert client.post("/logout").status_code == 400
    token = csrf(client, "/login")
    assert client.post("/logout", data={"csrf": token}).status_code == 302
    assert client.get("/").status_code == 302


@pytest.mark.slurm
def test_cluster_api_reads_slurm(client):
    r = client.get("/api/v1/cluster", headers={"Authorization": "Bearer " + TOKEN})
    assert r.status_code == 200
    body = r.get_json()
    assert {n["name"] for n in body["nodes"]} == {"g1n1", "g1n2", "g4n1", "g4n2", "inf1"}
    assert {p["name"]: p["gpus"] for p in body["partitions"]} == {"gpu-1card": 2, "gpu-4card": 8, "infer": 1}


@pytest.mark.slurm
def test_status_page_lists_nodes_after_login(client):
    login(client)
    page = client.get("/").get_data(as_text=True)
    for name in ("g1n1", "g1n2", "g4n1", "g4n2", "inf1", "gpu-1card", "gpu-4card", "infer"):
        assert name in page


def test_slurm_down_gives_503_with_the_command(app):
    app.extensions["aiportal.slurm"].timeout = 5
    app.extensions["aiportal.slurm"].slurm_conf = "/nonexistent/slurm.conf"
    r = app.test_client().get("/api/v1/cluster", headers={"Authorization": "Bearer " + TOKEN})
    assert r.status_code == 503
    assert r.get_json()["error"] == "slurm_unavailable"
    assert "sinfo" in r.get_json()["message"]
