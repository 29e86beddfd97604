"""The server-rendered pages through Flask's test client (no cluster: Slurm is a recorder; one
test, marked s3, browses a real bucket on the dev SeaweedFS).

Login and CSRF on every page and form, who sees what, the new-job form (field errors, "Show
script", submit), cancel/resubmit, the cluster page (admins drain/resume; Slurm down), images,
data sources, tokens, and the job list with 10,000 jobs."""
from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass, field, replace

import pytest
import sqlalchemy as sa
from sqlmodel import Session, select

from portal.logs.tail import LogChunk
from portal.models import Event, EventKind, Image, ImageState, Job, User, new_id
from portal.services import datasources
from slurm.backend import ClusterView
from slurm.cluster import Node, NodeState, Partition
from slurm.errors import SlurmCommandError
from slurm.states import JobState
from storage.credentials import DataSource, SecretBox

from .conftest import TEST_SIF, FakeBackend, bearer, csrf_of, login

CLOSED_PORT = 9          # nothing listens there: the log sshd is "down" for these tests
SIF = TEST_SIF


@dataclass
class ClusterBackend(FakeBackend):
    """The conftest recorder plus nodes, drain and resume (and an outage switch)."""

    drained: list[tuple[str, str]] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    down: bool = False

    def _check(self):
        if self.down:
            raise SlurmCommandError(["sinfo", "--noheader"], 1, stderr="slurm_load_partitions: Unable to contact "
                                                                       "slurm controller (connect failure)")

    def cluster(self):
        self._check()
        nodes = [Node("g1n1", ("gpu-1card",), NodeState.MIXED, True, 8, 4, 32000, 1, 1, "p40", ""),
                 Node("g1n2", ("gpu-1card",), NodeState.DRAINED, True, 8, 0, 32000, 1, 0, "p40", "replacing fan (ops)"),
                 Node("g4n1", ("gpu-4card",), NodeState.IDLE, True, 48, 0, 256000, 4, 0, "p40", "")]
        parts = [Partition("gpu-1card", True, ("g1n1", "g1n2"), "1-00:00:00", 2, 1),
                 Partition("gpu-4card", False, ("g4n1",), "1-00:00:00", 4, 0)]
        return ClusterView("aiportal", parts, nodes)

    def queue(self):
        self._check()
        return super().queue()

    def drain(self, node, reason):
        self._check()
        self.drained.append((node, reason))

    def resume(self, node):
        self._check()
        self.resumed.append(node)


@pytest.fixture
def fake_backend():
    return ClusterBackend()


@pytest.fixture
def settings(settings):
    """The conftest settings with the log sshd unreachable (pages must still render)."""
    return replace(settings, log_ssh_port=CLOSED_PORT)


def add_job(engine, user: User, **kw) -> str:
    with Session(engine) as db:
        job = Job(user_id=user.id, name=kw.pop("name", "train"), node_type="1card", partition="gpu-1card", gpus=1,
                  image=SIF, request_json='{"command": ["python3", "train.py"], "time_limit": "01:00:00"}', **kw)
        db.add(job)
        db.commit()
        return job.id


def job_form(**kw) -> dict:
    form = {"name": "mnist", "image": SIF, "node_type": "1card", "command": "python3 train.py --epochs 2",
            "time_limit": "00:30:00", "inputs": "", "output": "", "env": "SEED=1", "sweep": ""}
    form.update(kw)
    return form


def logged_in(client, name="alice"):
    assert login(client, name).status_code == 302
    return csrf_of(client, "/tokens")


# -- login and CSRF ----------------------------------------------------------------------------

PAGES = ["/", "/jobs", "/jobs?page=2", "/jobs/new", "/jobs/JOB", "/jobs/JOB/plot.svg", "/cluster", "/images",
         "/data", "/data?source=x&prefix=s3://b", "/tokens"]
FORMS = ["/jobs/new", "/jobs/JOB/cancel", "/jobs/JOB/resubmit", "/jobs/JOB/stage-out", "/cluster/nodes/g1n1/drain",
         "/cluster/nodes/g1n1/resume", "/images", "/images/1/delete", "/data", "/data/src/delete", "/tokens",
         "/tokens/1/revoke", "/account/sessions/revoke", "/account/password"]


@pytest.mark.parametrize("url", PAGES)
def test_every_page_needs_a_login(client, users, engine, url):
    url = url.replace("JOB", add_job(engine, users["alice"]))
    r = client.get(url)
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=")


@pytest.mark.parametrize("url", FORMS)
def test_every_form_needs_a_login(client, users, engine, url):
    r = client.post(url.replace("JOB", add_job(engine, users["alice"])), data={"csrf": "x"})
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")


@pytest.mark.parametrize("url", FORMS + ["/logout"])
def test_every_form_is_refused_without_csrf(client, users, engine, fake_backend, url):
    logged_in(client, "root-admin")
    job_id = add_job(engine, users["alice"], slurm_job_id="77", state=JobState.RUNNING)
    url = url.replace("JOB", job_id)
    data = {"reason": "x", "ref": SIF, "name": "n", **job_form()}
    for sent in ({}, {"csrf": "wrong"}):
        r = client.post(url, data={**data, **sent})
        assert r.status_code == 400, r.get_data(as_text=True)
        assert "CSRF" in r.get_data(as_text=True)
    assert fake_backend.submitted == [] and fake_backend.cancelled == [] and fake_backend.drained == []


def test_login_form_shows_the_error_and_keeps_the_name(client, users):
    r = client.post("/login", data={"name": "alice", "password": "nope", "csrf": csrf_of(client)})
    assert r.status_code == 401
    page = r.get_data(as_text=True)
    assert "wrong user name or password" in page and 'value="alice"' in page
    assert client.get("/jobs").status_code == 302


def test_login_goes_back_to_the_page_asked_for_and_logout_ends_it(client, users):
    r = client.get("/cluster")
    nxt = r.headers["Location"]
    r = client.post(nxt, data={"name": "alice", "password": "alice-password-1", "csrf": csrf_of(client, nxt)})
    assert r.status_code == 302 and r.headers["Location"] == "/cluster"
    page = client.get("/jobs").get_data(as_text=True)
    for link in ("Jobs", "New job", "Cluster", "Images", "Data", "Tokens", "Log out", "alice"):
        assert link in page
    r = client.post("/logout", data={"csrf": csrf_of(client, "/jobs")})
    assert r.status_code == 302
    assert client.get("/jobs").status_code == 302


# -- who sees what -----------------------------------------------------------------------------

def test_alice_cannot_see_bobs_job(client, engine, users, fake_backend):
    bobs = add_job(engine, users["bob"], name="bobs-secret-run", slurm_job_id="5", state=JobState.RUNNING)
    token = logged_in(client, "alice")
    for url in ("/jobs/%s" % bobs, "/jobs/%s/plot.svg" % bobs):
        r = client.get(url)
        assert r.status_code == 404 and "bobs-secret-run" not in r.get_data(as_text=True)
        assert r.mimetype == "text/html"
    for action in ("cancel", "resubmit"):
        assert client.post("/jobs/%s/%s" % (bobs, action), data={"csrf": token}).status_code == 404
    assert "bobs-secret-run" not in client.get("/jobs").get_data(as_text=True)
    assert fake_backend.cancelled == [] and fake_backend.submitted == []


def test_admin_sees_every_job_with_its_owner(client, engine, users):
    bobs = add_job(engine, users["bob"], name="bobs-run")
    add_job(engine, users["alice"], name="alices-run")
    logged_in(client, "root-admin")
    page = client.get("/jobs").get_data(as_text=True)
    assert "bobs-run" in page and "alices-run" in page and "<th>owner</th>" in page
    assert client.get("/jobs/%s" % bobs).status_code == 200


def add_source(engine, app, user: User, name: str, buckets=("bucket-b",)):
    box: SecretBox = app.extensions["aiportal.secrets"]
    with Session(engine) as db:
        datasources.add_source(db, box, user, DataSource(name=name, endpoint="http://127.0.0.1:9000", region="us-east-1",
                                                         access_key="AKIAEXAMPLE1234", secret_key="s3cr3t-value-xyz",
                                                         buckets=tuple(buckets)))
        db.commit()


def test_alice_cannot_see_bobs_data_sources(client, app, engine, users):
    add_source(engine, app, users["bob"], "bobs-store")
    token = logged_in(client, "alice")
    assert "bobs-store" not in client.get("/data").get_data(as_text=True)
    r = client.get("/data?source=bobs-store&prefix=s3://bucket-b")
    assert r.status_code == 404
    assert "data source &#39;bobs-store&#39;: not found, or not yours" in r.get_data(as_text=True)
    assert client.post("/data/bobs-store/delete", data={"csrf": token}).status_code == 404
    with Session(engine) as db:
        assert db.exec(select(sa.func.count()).select_from(datasources.DataSourceRecord)).one() == 1
    assert "bobs-store" not in client.get("/jobs/new").get_data(as_text=True)


# -- the new-job form --------------------------------------------------------------------------

def test_validation_errors_show_next_to_their_fields_with_the_input_kept(client, users, fake_backend):
    token = logged_in(client)
    form = job_form(name="keep-me", command="", env="NOT A PAIR", sweep="LR=", image="",
                    inputs="/srv/x\ns3://b/p", output="s3://out/<b>")
    r = client.post("/jobs/new", data={**form, "csrf": token, "action": "submit"})
    assert r.status_code == 422
    page = r.get_data(as_text=True)
    for name in ("command", "env", "sweep", "image"):
        assert 'id="err-%s"' % name in page, name
    # each message sits right after its own field
    assert page.index('id="err-command"') > page.index('id="command"') > page.index('id="err-image"')
    assert 'value="keep-me"' in page and "NOT A PAIR</textarea>" in page and "/srv/x\ns3://b/p</textarea>" in page
    assert 's3://out/&lt;b&gt;' in page and "s3://out/<b>" not in page
    assert 'value="1card" checked' in page.replace('id="node_type-1card" ', "")
    assert fake_backend.submitted == []


def test_site_checks_show_at_their_field(client, users, fake_backend):
    token = logged_in(client)
    r = client.post("/jobs/new", data={**job_form(node_type="8card", time_limit="forever"), "csrf": token,
                                       "action": "script"})
    assert r.status_code == 422
    page = r.get_data(as_text=True)
    assert 'id="err-node_type"' in page or 'id="err-time_limit"' in page
    assert "<pre id=\"script\">" not in page


def test_show_script_renders_the_batch_script_and_submits_nothing(client, engine, users, fake_backend):
    token = logged_in(client)
    r = client.post("/jobs/new", data={**job_form(), "csrf": token, "action": "script"})
    assert r.status_code == 200, re.findall(r'(?:field-error|<li)[^<]*', r.get_data(as_text=True))
    page = r.get_data(as_text=True)
    assert "#SBATCH --partition=gpu-1card" in page and "python3 train.py --epochs 2" in page
    assert 'value="mnist"' in page                      # the form is still filled in
    assert fake_backend.submitted == []
    with Session(engine) as db:
        assert db.exec(select(sa.func.count()).select_from(Job)).one() == 0


def test_submit_goes_to_the_job_page_and_the_page_survives_a_dead_log_host(client, users, fake_backend):
    token = logged_in(client)
    r = client.post("/jobs/new", data={**job_form(command="python3 -c \"print('<script>x</script>')\""),
                                       "csrf": token, "action": "submit"})
    assert r.status_code == 302, r.get_data(as_text=True)
    m = re.fullmatch(r"/jobs/([0-9a-f-]{36})", r.headers["Location"])
    assert m
    assert len(fake_backend.submitted) == 1 and fake_backend.submitted[0][1] == "alice"
    page = client.get(r.headers["Location"]).get_data(as_text=True)
    assert "job submitted as Slurm job 1001" in page
    assert "PENDING" in page and "#SBATCH --partition=gpu-1card" in page and "gpu-1card" in page
    assert "00:30:00" in page and "SEED=1" in page
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    # the page reads nothing over SSH (sshd is "down" here): its script fetches the plot
    assert "Reading the progress from the log" in page and "cannot read log" not in page
    assert "/api/v1/jobs/%s/log?follow=1" % m.group(1) in page and "/plot.svg" in page
    r = client.get(r.headers["Location"] + "/plot.svg")
    assert r.status_code == 503 and "cannot read log" in r.get_data(as_text=True)


def test_plot_fragment_draws_the_progress_lines(client, engine, users, monkeypatch):
    job_id = add_job(engine, users["alice"], slurm_job_id="42", job_dir="/srv/aiportal/shared/users/alice/jobs/x",
                     state=JobState.RUNNING)
    text = "".join("step %d, loss = %.2f (%d examples/sec; 0.1 sec/batch)\n" % (i, 3 - i / 10, 100 + i)
                   for i in range(20))
    seen = []

    def read_log(target, path, offset=0, limit=0, **kw):
        seen.append((target.user, path))
        return LogChunk(offset, text.encode())
    monkeypatch.setattr("portal.logs.tail.read_log", read_log)
    logged_in(client)
    r = client.get("/jobs/%s/plot.svg" % job_id)
    assert r.status_code == 200 and r.mimetype == "image/svg+xml"
    assert r.get_data(as_text=True).count("<polyline") == 2
    assert seen == [("alice", "/srv/aiportal/shared/users/alice/jobs/x/logs/slurm-42.out")]
    seen.clear()
    page = client.get("/jobs/%s" % job_id).get_data(as_text=True)
    assert '<div class="plot-box" id="plot"><svg' in page and "<polyline" not in page
    assert seen == []           # the page itself reads no log: its script fetches plot.svg


def test_cancel_and_resubmit_buttons(client, engine, users, fake_backend):
    token = logged_in(client)
    r = client.post("/jobs/new", data={**job_form(), "csrf": token, "action": "submit"})
    job_url = r.headers["Location"]
    page = client.get(job_url).get_data(as_text=True)
    assert 'id="cancel"' in page and 'id="resubmit"' in page
    r = client.post(job_url + "/cancel", data={"csrf": token})
    assert r.status_code == 302 and r.headers["Location"] == job_url
    assert fake_backend.cancelled == [("1001", "alice")]
    assert "cancel requested" in client.get(job_url).get_data(as_text=True)
    r = client.post(job_url + "/resubmit", data={"csrf": token})
    assert r.status_code == 302 and r.headers["Location"] != job_url
    assert len(fake_backend.submitted) == 2
    assert "resubmitted job" in client.get(r.headers["Location"]).get_data(as_text=True)
    # an ended job cannot be cancelled: the message says so, nothing is sent to Slurm
    with Session(engine) as db:
        job = db.get(Job, job_url.rsplit("/", 1)[1])
        job.state = JobState.COMPLETED
        db.add(job)
        db.commit()
    assert 'id="cancel"' not in client.get(job_url).get_data(as_text=True)
    client.post(job_url + "/cancel", data={"csrf": token})
    assert "has already ended" in client.get(job_url).get_data(as_text=True)
    assert len(fake_backend.cancelled) == 1


def test_job_page_shows_the_timeline(client, engine, users):
    job_id = add_job(engine, users["alice"], slurm_job_id="9", state=JobState.COMPLETED, exit_code=0, nodes="g1n1")
    now = dt.datetime.now(dt.timezone.utc)
    with Session(engine) as db:
        for i, (kind, state, node, msg) in enumerate([
                (EventKind.SUBMITTED, JobState.PENDING, None, "submitted as Slurm job 9 to gpu-1card"),
                (EventKind.STATE, JobState.PENDING, None, "pending: Resources"),
                (EventKind.STATE, JobState.RUNNING, "g1n1", "running on g1n1"),
                (EventKind.REQUEUED, JobState.PENDING, None, "requeued after node failure"),
                (EventKind.FINISHED, JobState.COMPLETED, "g1n1", "completed with exit code 0")]):
            db.add(Event(at=now + dt.timedelta(seconds=i), kind=kind, job_id=job_id, user_id=users["alice"].id,
                         state=state, node=node, message=msg))
        db.commit()
    logged_in(client)
    page = client.get("/jobs/%s" % job_id).get_data(as_text=True)
    order = [page.index(s) for s in ("submitted as Slurm job 9", "pending: Resources", "running on g1n1",
                                     "requeued after node failure", "completed with exit code 0")]
    assert order == sorted(order)
    assert 'id="cancel"' not in page


def test_edit_and_submit_again_fills_the_form(client, users, fake_backend):
    token = logged_in(client)
    r = client.post("/jobs/new", data={**job_form(sweep="LR=0.1,0.01"), "csrf": token, "action": "submit"})
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    page = client.get("/jobs/new?from=%s" % job_id).get_data(as_text=True)
    assert 'value="mnist"' in page and "LR=0.1,0.01</textarea>" in page and "SEED=1</textarea>" in page


# -- cluster -----------------------------------------------------------------------------------

def test_cluster_page_shows_nodes_gpus_and_queue(client, users, fake_backend):
    fake_backend.submit("#SBATCH --comment=x\n", "alice")
    logged_in(client)
    page = client.get("/cluster").get_data(as_text=True)
    for text in ("g1n1", "g1n2", "g4n1", "replacing fan (ops)", "gpu-4card"):
        assert text in page
    assert re.search(r'<td class="num">1 / 2</td>', page)               # 1card: 1 of 2 GPUs used
    assert '<b id="queue-pending">1</b>' in page
    assert "Drain</button>" not in page                                  # not an admin


def test_only_admins_drain_and_resume(client, engine, users, fake_backend):
    token = logged_in(client, "alice")
    assert client.post("/cluster/nodes/g1n1/drain", data={"csrf": token, "reason": "x"}).status_code == 403
    assert client.post("/cluster/nodes/g1n2/resume", data={"csrf": token}).status_code == 403
    assert fake_backend.drained == [] and fake_backend.resumed == []
    client.post("/logout", data={"csrf": token})
    token = logged_in(client, "root-admin")
    page = client.get("/cluster").get_data(as_text=True)
    assert "Drain</button>" in page and "Resume</button>" in page
    r = client.post("/cluster/nodes/g1n1/drain", data={"csrf": token, "reason": "replacing GPU 0"})
    assert r.status_code == 302 and fake_backend.drained == [("g1n1", "replacing GPU 0 (root-admin)")]
    client.post("/cluster/nodes/g1n2/resume", data={"csrf": token})
    assert fake_backend.resumed == ["g1n2"]
    page = client.get("/cluster").get_data(as_text=True)
    assert "drained by root-admin: replacing GPU 0" in page and "resumed by root-admin" in page
    client.post("/cluster/nodes/g1n1/drain", data={"csrf": token, "reason": "aiportal: mine"})
    assert "belong to the health monitor" in client.get("/cluster").get_data(as_text=True)
    assert len(fake_backend.drained) == 1


def test_cluster_page_says_when_slurm_is_down(client, users, fake_backend):
    fake_backend.down = True
    logged_in(client)
    r = client.get("/cluster")
    page = r.get_data(as_text=True)
    assert r.status_code == 503 and "Slurm is not answering" in page and "Unable to contact slurm controller" in page


# -- images, data, tokens ----------------------------------------------------------------------

def test_images_page_registers_and_lists(client, engine, users):
    token = logged_in(client)
    r = client.post("/images", data={"csrf": token, "ref": "ftp://nope"})
    assert r.status_code == 422 and 'id="err-ref"' in r.get_data(as_text=True)
    assert 'value="ftp://nope"' in r.get_data(as_text=True)
    r = client.post("/images", data={"csrf": token, "ref": SIF})
    assert r.status_code == 302
    page = client.get("/images").get_data(as_text=True)
    assert SIF in page and "READY" in page and "SIF cache" in page
    with Session(engine) as db:
        db.add(Image(user_id=users["alice"].id, ref="docker-archive:/x.tar", state=ImageState.FAILED,
                     message="conversion job 12 ended FAILED"))
        db.commit()
    page = client.get("/images").get_data(as_text=True)
    assert "FAILED" in page and "conversion job 12 ended FAILED" in page
    # the new-job form offers the ready image
    assert '<option value="%s"' % SIF in client.get("/jobs/new").get_data(as_text=True)


def test_data_page_adds_lists_and_deletes_without_showing_secrets(client, app, engine, users):
    token = logged_in(client)
    form = {"csrf": token, "name": "lab", "endpoint": "ftp://x", "region": "us-east-1", "access_key": "AKIAEXAMPLE1234",
            "secret_key": "s3cr3t-value-xyz", "buckets": "data models", "bandwidth_mbps": ""}
    r = client.post("/data", data=form)
    page = r.get_data(as_text=True)
    assert r.status_code == 422 and "must be http(s)://HOST[:PORT]" in page and 'value="ftp://x"' in page
    assert "s3cr3t-value-xyz" not in page
    r = client.post("/data", data={**form, "endpoint": "http://127.0.0.1:9000"})     # no access check
    assert r.status_code == 302
    page = client.get("/data").get_data(as_text=True)
    assert "lab" in page and "AKIA..." in page and "AKIAEXAMPLE1234" not in page and "s3cr3t" not in page
    assert "s3://data/" in client.get("/jobs/new").get_data(as_text=True)      # the inputs picker
    r = client.post("/data", data={**form, "endpoint": "http://127.0.0.1:9000"})
    assert r.status_code == 422 and "already have a data source named" in r.get_data(as_text=True)
    assert client.post("/data/lab/delete", data={"csrf": token}).status_code == 302
    assert "AKIA..." not in client.get("/data").get_data(as_text=True)


def test_data_browse_refuses_a_bad_prefix(client, app, engine, users):
    add_source(engine, app, users["alice"], "mine")
    logged_in(client)
    r = client.get("/data?source=mine&prefix=/etc")
    assert r.status_code == 422 and "give a location of data source mine, e.g. s3://" in r.get_data(as_text=True)


def test_token_is_shown_once_then_only_its_prefix(client, users):
    token = logged_in(client)
    r = client.post("/tokens", data={"csrf": token, "name": "laptop", "expires_days": ""})
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    clear = re.search(r'id="new-token">(aip_[^<]+)<', r.get_data(as_text=True)).group(1)
    assert client.get("/api/v1/me", headers=bearer(clear)).get_json()["name"] == "alice"
    page = client.get("/tokens").get_data(as_text=True)
    assert clear not in page and clear[:12] in page and "laptop" in page and "never" in page
    tid = re.search(r'/tokens/(\d+)/revoke', page).group(1)
    assert client.post("/tokens/%s/revoke" % tid, data={"csrf": token}).status_code == 302
    assert "revoked" in client.get("/tokens").get_data(as_text=True)
    assert client.get("/api/v1/me", headers=bearer(clear)).status_code == 401
    r = client.post("/tokens", data={"csrf": token, "name": "x", "expires_days": "soon"})
    assert r.status_code == 422 and 'id="err-expires_days"' in r.get_data(as_text=True)


# -- the job list at scale ---------------------------------------------------------------------

def insert_jobs(engine, user_ids, n: int) -> None:
    """``n`` jobs straight into the table (one executemany), spread over users and states."""
    states = [JobState.COMPLETED, JobState.RUNNING, JobState.PENDING, JobState.FAILED]
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"id": new_id(), "user_id": user_ids[i % len(user_ids)], "name": "job-%05d" % i,
             "state": states[i % len(states)].name, "node_type": "1card", "partition": "gpu-1card", "gpus": 1,
             "slurm_job_id": str(10000 + i), "external": i % 10 == 0, "image": SIF, "request_json": "{}",
             "script": "", "job_dir": "", "reason": "", "nodes": "g1n1", "restarts": 0,
             "created_at": t0 + dt.timedelta(seconds=i), "updated_at": t0 + dt.timedelta(seconds=i)}
            for i in range(n)]
    with engine.begin() as conn:
        conn.execute(sa.insert(Job.__table__), rows)


def test_job_list_with_10000_jobs_pages_and_filters(client, engine, users):
    insert_jobs(engine, [users["alice"].id, users["bob"].id], 10_000)
    logged_in(client)
    t0 = time.perf_counter()
    r = client.get("/jobs")
    elapsed = time.perf_counter() - t0
    page = r.get_data(as_text=True)
    assert r.status_code == 200
    assert "5000 jobs" in page and "page 1 of 100" in page and 'rel="next"' in page
    assert len(re.findall(r'href="/jobs/[0-9a-f-]{36}"', page)) == 50
    assert "job-09998" in page and "job-09999" not in page            # newest of alice's first; bob's hidden
    assert elapsed < 2.0, "page 1 of 10,000 jobs took %.2f s" % elapsed   # the 300 ms target: bench/
    page = client.get("/jobs?page=100").get_data(as_text=True)
    assert "page 100 of 100" in page and "job-00000" in page and 'rel="next"' not in page
    page = client.get("/jobs?state=pending").get_data(as_text=True)
    assert "2500 jobs" in page and "COMPLETED" not in page.split('<table id="jobs">')[1]
    page = client.get("/jobs?state=bogus").get_data(as_text=True)
    assert "unknown state" in page and "5000 jobs" in page
    assert '<span class="tag" title="submitted with plain sbatch">sbatch</span>' in client.get("/jobs").get_data(
        as_text=True)


@pytest.mark.s3
def test_data_page_checks_keys_and_browses_a_real_bucket(client, users, s3_credentials):
    from storage.s3 import S3Store
    from tests.storage.s3_helpers import admin_source, drop_bucket, make_bucket

    source = admin_source(s3_credentials)
    bucket = make_bucket(source, "web")
    try:
        with S3Store(source) as s:
            for key in ("train/a.bin", "train/b.bin", "readme.txt"):
                s.client.put_object(Bucket=bucket, Key=key, Body=b"x" * 2048)
        token = logged_in(client)
        form = {"csrf": token, "name": "lab", "endpoint": s3_credentials["endpoint"], "region": "us-east-1",
                "access_key": s3_credentials["access_key"], "buckets": bucket, "check": "1"}
        r = client.post("/data", data={**form, "secret_key": "wrong-secret-key"})
        assert r.status_code == 422 and "refused the keys" in r.get_data(as_text=True)
        assert client.post("/data", data={**form, "secret_key": s3_credentials["secret_key"]}).status_code == 302
        page = client.get("/data?source=lab").get_data(as_text=True)          # the first bucket by default
        assert 'id="listing"' in page and "train/</a>" in page and "readme.txt" in page and "2.0 KB" in page
        assert s3_credentials["secret_key"] not in page and s3_credentials["access_key"] not in page
        page = client.get("/data?source=lab&prefix=s3://%s/train" % bucket).get_data(as_text=True)
        assert "a.bin" in page and "b.bin" in page and "readme.txt" not in page
        assert "s3://%s/train/a.bin" % bucket in page and ">up</a>" in page
    finally:
        drop_bucket(source, bucket)


def test_edit_and_submit_again_of_a_plain_sbatch_job_says_why_not(client, engine, users):
    from portal.models import Job
    with Session(engine) as db:
        db.add(Job(id="ext-1", user_id=users["alice"].id, name="sbatch-job", external=True, slurm_job_id="77",
                   request_json='{"stdout": "/x/slurm-%j.out"}'))
        db.commit()
    logged_in(client)
    r = client.get("/jobs/new?from=ext-1")
    assert r.status_code == 422 and "submitted with plain sbatch" in r.get_data(as_text=True)
