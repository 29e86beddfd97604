"""The Flask app through its test client: auth on every endpoint, users see only their own
things, CSRF, validation with messages, the error format."""
import json

import pytest
from sqlmodel import Session, select

from portal.models import DataSourceRecord, Job
from tests.portal.conftest import ADMIN_TOKEN, PASSWORDS, TEST_SIF, bearer, csrf_of, login

SIF = TEST_SIF
JOB = {"image": SIF, "node_type": "1card", "command": ["python3", "-c", "print(1)"]}

# every API endpoint, with a method and a body that would be valid for its owner
ENDPOINTS = [
    ("GET", "/api/v1/me"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"),
    ("POST", "/api/v1/scripts"), ("GET", "/api/v1/jobs/x"), ("POST", "/api/v1/jobs/x/cancel"),
    ("POST", "/api/v1/jobs/x/resubmit"), ("GET", "/api/v1/jobs/x/log"), ("GET", "/api/v1/jobs/x/progress"),
    ("GET", "/api/v1/jobs/x/outputs"), ("GET", "/api/v1/jobs/x/outputs/a.txt"), ("GET", "/api/v1/cluster"),
    ("POST", "/api/v1/cluster/nodes/g1n1/drain"), ("POST", "/api/v1/cluster/nodes/g1n1/resume"),
    ("GET", "/api/v1/images"), ("POST", "/api/v1/images"), ("DELETE", "/api/v1/images/1"),
    ("GET", "/api/v1/images/cache"),
    ("GET", "/api/v1/datasources"), ("POST", "/api/v1/datasources"), ("DELETE", "/api/v1/datasources/x"),
    ("GET", "/api/v1/datasources/x/browse"), ("GET", "/api/v1/tokens"), ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/1"), ("GET", "/api/v1/services"), ("POST", "/api/v1/services"),
    ("GET", "/api/v1/services/x"), ("DELETE", "/api/v1/services/x"), ("POST", "/api/v1/services/x/scale"),
    ("POST", "/api/v1/services/x/access"), ("GET", "/api/v1/services/x/replicas/0/log"),
    ("POST", "/api/v1/services/x/update"),
    ("POST", "/api/v1/images/build"), ("GET", "/api/v1/images/builds"), ("GET", "/api/v1/images/builds/1"),
    ("DELETE", "/api/v1/images/builds/1"), ("GET", "/api/v1/images/builds/1/log"),
    ("GET", "/api/v1/registries"), ("POST", "/api/v1/registries"), ("DELETE", "/api/v1/registries/localhost:5000"),
    ("GET", "/api/v1/images/choices"), ("GET", "/api/v1/images/check"),
    ("POST", "/api/v1/jobs/x/stage-out"), ("GET", "/api/v1/jobs/x/stage-out/log"),
    ("GET", "/api/v1/sessions"), ("POST", "/api/v1/sessions/revoke"),
]


def test_healthz_is_open_and_says_nothing_else(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_data(as_text=True) == "ok\n"


@pytest.mark.parametrize("method, path", ENDPOINTS)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"},
                                     {"Authorization": "Bearer "}])
def test_every_endpoint_requires_a_token(client, method, path, headers):
    r = client.open(path, method=method, headers=headers, json={})
    assert r.status_code == 401, (method, path, r.status_code)
    assert r.get_json()["error"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


# what anyone may read without a token: the API's own document, as API users expect
OPEN = [("GET", "/api/v1/openapi.json")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_the_openapi_document_is_served_without_a_token(client, headers):
    r = client.get("/api/v1/openapi.json", headers=headers)
    assert r.status_code == 200 and r.get_json()["openapi"].startswith("3.1")


def test_every_api_route_is_in_the_auth_table(app):
    """A new API route must be added to ENDPOINTS above (and so gets checked for auth), or to
    OPEN, the routes declared with auth=False."""
    from portal.api import OPERATIONS
    adapter = app.url_map.bind("localhost")
    assert {(op.method, "/api/v1" + op.rule) for op in OPERATIONS if not op.auth} == \
        {(m, adapter.match(p, method=m)[0] and r.rule) for m, p in OPEN for r in app.url_map.iter_rules()
         if r.endpoint == adapter.match(p, method=m)[0]}
    hit = {(adapter.match(path, method=method)[0], method) for method, path in ENDPOINTS + OPEN}
    routes = {(r.endpoint, m) for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")
              for m in r.methods - {"HEAD", "OPTIONS"}}
    assert routes - hit == set()


def test_token_revoked_or_of_a_disabled_user_is_refused(client, tokens, engine, users):
    assert client.get("/api/v1/me", headers=bearer(tokens["alice"])).status_code == 200
    tid = client.get("/api/v1/tokens", headers=bearer(tokens["alice"])).get_json()["tokens"][0]["id"]
    assert client.delete("/api/v1/tokens/%d" % tid, headers=bearer(tokens["alice"])).status_code == 204
    assert client.get("/api/v1/me", headers=bearer(tokens["alice"])).status_code == 401


def test_bootstrap_admin_token_is_the_admin_account(client):
    r = client.get("/api/v1/me", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 200 and r.get_json()["is_admin"] and r.get_json()["name"] == "admin"


def test_new_token_is_shown_once_and_stored_hashed(client, tokens, engine):
    r = client.post("/api/v1/tokens", headers=bearer(tokens["bob"]), json={"name": "ci"})
    assert r.status_code == 201
    new = r.get_json()["token"]
    assert client.get("/api/v1/me", headers=bearer(new)).get_json()["name"] == "bob"
    listing = client.get("/api/v1/tokens", headers=bearer(new)).get_data(as_text=True)
    assert new not in listing
    with engine.connect() as conn:
        dump = "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM api_tokens"))
    assert new not in dump


def test_submit_stores_then_submits_as_the_users_unix_account(client, tokens, fake_backend, engine):
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["state"] == "PENDING" and body["slurm_job_id"] and body["owner"] == "alice"
    script, user = fake_backend.submitted[0]
    assert user == "alice" and "#SBATCH --comment=aiportal:%s" % body["id"] in script
    shown = client.get("/api/v1/jobs/%s" % body["id"], headers=bearer(tokens["alice"])).get_json()
    assert shown["script"] == script
    assert [e["kind"] for e in shown["events"]] == ["submitted"]


def test_other_users_jobs_are_not_found(client, tokens, fake_backend):
    jid = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB).get_json()["id"]
    for path in ("", "/log", "/outputs", "/progress"):
        r = client.get("/api/v1/jobs/%s%s" % (jid, path), headers=bearer(tokens["bob"]))
        assert r.status_code == 404 and r.get_json()["error"] == "not_found", path
    assert client.post("/api/v1/jobs/%s/cancel" % jid, headers=bearer(tokens["bob"])).status_code == 404
    assert client.get("/api/v1/jobs", headers=bearer(tokens["bob"])).get_json()["total"] == 0
    assert client.get("/api/v1/jobs", headers=bearer(tokens["root-admin"])).get_json()["total"] == 1
    assert client.get("/api/v1/jobs/%s" % jid, headers=bearer(tokens["root-admin"])).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({**JOB, "node_type": "9card"}, "node_type"),
    ({**JOB, "image": "relative.sif"}, "image"),
    ({**JOB, "image": "docker://Ubuntu:22.04"}, "image"),
    ({**JOB, "command": []}, "command"),
    ({**JOB, "command": "python3 'unclosed"}, "command"),
    ({**JOB, "time_limit": "forever"}, "time_limit"),
    ({**JOB, "env": "NOEQUALS"}, "env"),
    ({**JOB, "env": {"SLURM_JOB_ID": "1"}}, "env"),
    ({**JOB, "gpus": 5}, "gpus"),
    ({**JOB, "gpus": "many"}, "gpus"),
    ({**JOB, "sweep": "LR"}, "sweep"),
    ({**JOB, "name": "bad name!"}, "name"),
    ({**JOB, "project": "nope"}, "project"),
])
def test_invalid_submissions_get_422_naming_the_field_and_nothing_is_stored(client, tokens, fake_backend,
                                                                            engine, body, field):
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=body)
    assert r.status_code == 422, r.get_json()
    assert field in r.get_json()["errors"], r.get_json()
    assert not fake_backend.submitted
    with Session(engine) as db:
        assert db.exec(select(Job)).first() is None


@pytest.mark.parametrize("data, status", [("not json", 422), ("[1, 2]", 422)])
def test_body_must_be_a_json_object(client, tokens, data, status):
    r = client.post("/api/v1/jobs", headers={**bearer(tokens["alice"]), "Content-Type": "application/json"},
                    data=data)
    assert r.status_code == status and r.get_json()["error"] == "invalid"


def test_data_outside_the_users_roots_is_refused_before_submitting(client, tokens, fake_backend, settings):
    body = {**JOB, "inputs": ["%s/users/bob/secret" % settings.shared_root]}
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=body)
    assert r.status_code == 400 and r.get_json()["error"] == "bad_location"
    assert not fake_backend.submitted


def test_show_script_renders_without_submitting(client, tokens, fake_backend):
    r = client.post("/api/v1/scripts", headers=bearer(tokens["alice"]),
                    json={**JOB, "sweep": {"LR": [0.1, 0.01]}, "env": {"EPOCHS": "3"}})
    assert r.status_code == 200
    script = r.get_json()["script"]
    assert "#SBATCH --partition=gpu-1card" in script and "#SBATCH --array=0-1" in script
    assert not fake_backend.submitted


def test_cancel_asks_slurm_as_the_owner_and_a_finished_job_conflicts(client, tokens, fake_backend, engine):
    jid = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB).get_json()["id"]
    r = client.post("/api/v1/jobs/%s/cancel" % jid, headers=bearer(tokens["root-admin"]))
    assert r.status_code == 202
    assert fake_backend.cancelled == [(r.get_json()["slurm_job_id"], "alice")]
    with Session(engine) as db:
        job = db.get(Job, jid)
        from slurm.states import JobState
        job.state = JobState.COMPLETED
        db.add(job)
        db.commit()
    r = client.post("/api/v1/jobs/%s/cancel" % jid, headers=bearer(tokens["alice"]))
    assert r.status_code == 409 and r.get_json()["error"] == "conflict"


def test_resubmit_makes_a_new_job_with_the_same_request(client, tokens, fake_backend):
    first = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB).get_json()
    r = client.post("/api/v1/jobs/%s/resubmit" % first["id"], headers=bearer(tokens["alice"]))
    assert r.status_code == 201
    second = r.get_json()
    assert second["id"] != first["id"] and second["request"] == first["request"]
    assert len(fake_backend.submitted) == 2


def test_refused_submission_is_recorded_failed_and_raises(client, tokens, fake_backend, engine):
    from slurm.errors import SubmitError

    def refuse(script, user=None):
        raise SubmitError(["sbatch"], 1, "", "sbatch: error: Batch job submission failed: Invalid account")
    fake_backend.submit = refuse
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB)
    assert r.status_code == 422 and "Invalid account" in r.get_json()["message"]
    with Session(engine) as db:
        job = db.exec(select(Job)).one()
        assert job.state.value == "FAILED" and "Invalid account" in job.reason


def test_admin_only_node_actions(client, tokens, fake_backend):
    r = client.post("/api/v1/cluster/nodes/g1n1/drain", headers=bearer(tokens["alice"]), json={"reason": "x"})
    assert r.status_code == 403 and r.get_json()["error"] == "forbidden"
    r = client.post("/api/v1/cluster/nodes/g1n1/drain", headers=bearer(tokens["root-admin"]),
                    json={"reason": "aiportal: fake"})
    assert r.status_code == 422 and "reason" in r.get_json()["errors"]


def test_datasource_keys_are_sealed_and_never_returned(client, tokens, engine):
    body = {"name": "lab", "endpoint": "http://127.0.0.1:9000", "access_key": "AKIAEXAMPLEKEY123",
            "secret_key": "very-secret-key-material", "buckets": ["data"], "check": False}
    r = client.post("/api/v1/datasources", headers=bearer(tokens["alice"]), json=body)
    assert r.status_code == 201, r.get_json()
    text = json.dumps(r.get_json()) + client.get("/api/v1/datasources", headers=bearer(tokens["alice"])).get_data(as_text=True)
    assert "very-secret-key-material" not in text and "AKIAEXAMPLEKEY123" not in text
    with engine.connect() as conn:
        dump = "\n".join(str(row) for row in conn.exec_driver_sql("SELECT * FROM datasources"))
    assert "very-secret-key-material" not in dump and "AKIAEXAMPLEKEY123" not in dump
    assert client.get("/api/v1/datasources", headers=bearer(tokens["bob"])).get_json()["datasources"] == []
    assert client.get("/api/v1/datasources/lab/browse?prefix=s3://data", headers=bearer(tokens["bob"])).status_code == 404
    r = client.post("/api/v1/datasources", headers=bearer(tokens["alice"]), json=body)
    assert r.status_code == 409
    with Session(engine) as db:
        assert len(db.exec(select(DataSourceRecord)).all()) == 1


def test_session_api_calls_need_the_csrf_header_for_writes(client, fake_backend):
    login(client, "alice")
    assert client.get("/api/v1/me").status_code == 200
    r = client.post("/api/v1/jobs", json=JOB)
    assert r.status_code == 400 and r.get_json()["error"] == "csrf"
    token = csrf_of(client, "/login")
    assert client.post("/api/v1/jobs", json=JOB, headers={"X-CSRF-Token": token}).status_code == 201


def test_login_without_csrf_is_refused(client):
    r = client.post("/login", data={"name": "alice", "password": PASSWORDS["alice"]})
    assert r.status_code == 400


def test_login_with_a_wrong_password_is_refused(client):
    r = login(client, "alice", "wrong-password")
    assert r.status_code == 401 and "wrong user name or password" in r.get_data(as_text=True)


def test_logins_are_rate_limited_per_account(client):
    for _ in range(5):
        assert login(client, "bob", "wrong-password").status_code == 401
    r = login(client, "bob")        # right password, but too many failures just now
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert login(client, "alice").status_code == 302     # other accounts are not locked


@pytest.mark.parametrize("nxt, where", [("/jobs", "/jobs"), ("//evil.example/x", "/"), ("https://evil.example", "/"),
                                        ("/\\evil.example", "/")])
def test_login_redirect_stays_on_the_portal(client, nxt, where):
    r = client.post("/login?next=%s" % nxt, data={"name": "alice", "password": PASSWORDS["alice"],
                                                  "csrf": csrf_of(client)})
    assert r.status_code == 302 and r.headers["Location"] == where


def test_logout_needs_csrf_and_ends_the_session(client):
    login(client, "alice")
    assert client.post("/logout").status_code == 400
    token = csrf_of(client, "/login")
    assert client.post("/logout", data={"csrf": token}).status_code == 302
    assert client.get("/api/v1/me").status_code == 401


def test_changing_the_password_ends_old_sessions(client, engine, users):
    login(client, "alice")
    assert client.get("/api/v1/me").status_code == 200
    from portal.models import User
    from portal.services import accounts
    with Session(engine) as db:
        accounts.set_password(db, db.get(User, users["alice"].id), "a-new-password-1")
        db.commit()
    assert client.get("/api/v1/me").status_code == 401


@pytest.mark.slurm
def test_cluster_api_reads_slurm(settings, engine, users, tokens):
    from portal.app import create_app
    client = create_app({"TESTING": True}, settings=settings, engine=engine).test_client()
    r = client.get("/api/v1/cluster", headers=bearer(tokens["alice"]))
    assert r.status_code == 200
    body = r.get_json()
    assert {n["name"] for n in body["nodes"]} == {"g1n1", "g1n2", "g4n1", "g4n2", "inf1"}
    assert {p["name"]: p["gpus"] for p in body["partitions"]} == {"gpu-1card": 2, "gpu-4card": 8, "infer": 1}
    assert set(body["queue"]) == {"pending", "running"}


def test_slurm_down_gives_503_with_the_command(settings, engine, users, tokens):
    from portal.app import create_app
    from slurm.backend import SlurmCli
    app = create_app({"TESTING": True}, settings=settings, engine=engine,
                     backend=SlurmCli("/nonexistent/slurm.conf", 5))
    r = app.test_client().get("/api/v1/cluster", headers=bearer(tokens["alice"]))
    assert r.status_code == 503
    assert r.get_json()["error"] == "slurm_unavailable"
    assert "sinfo" in r.get_json()["message"]


def test_admin_logs_in_with_the_bootstrap_token(client):
    r = login(client, "admin", ADMIN_TOKEN)
    assert r.status_code == 302
    assert client.get("/api/v1/me").get_json()["is_admin"]
    client.post("/logout", data={"csrf": csrf_of(client, "/login")})
    assert login(client, "admin", "not-the-token").status_code == 401


def test_a_database_that_does_not_answer_gives_503_with_retry_after(client, tokens, monkeypatch):
    import sqlalchemy.exc
    from portal.services import jobs

    def down(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO jobs ...", {}, Exception("database is locked"))
    monkeypatch.setattr(jobs, "submit_job", down)
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                    json={"image": "/x.sif", "node_type": "1card", "command": "true"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.get_json()["error"] == "database_unavailable" and "INSERT" not in r.get_data(as_text=True)
