"""Inference services end to end through a running portal (gunicorn + reconciler) on the dev
cluster: replicas are Slurm jobs on `infer` running the serving runtime in the base image
(real Apptainer) with the toy model staged in from alice's folder.

Each test deploys its own service; teardown deletes it and cancels every replica job by id."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, select

from inference.controller import Phase
from portal.models import Service, ServiceReplica
from storage.credentials import SecretBox
from tests.conftest import SHARED_ROOT
from tests.inference.conftest import TOY
from tests.portal.conftest import _stop, api_call, free_port, start_router

pytestmark = [pytest.mark.portal, pytest.mark.slurm, pytest.mark.apptainer]


def infer(url, name, token, body: bytes, method="POST", timeout=30):
    """(status, parsed answer, headers) of one request through the router."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    req = urllib.request.Request("%s/service/%s" % (url, name), data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw, \
                resp.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), e.headers


class Load:
    """Clients sending requests in a loop until stopped; every answer is recorded."""

    def __init__(self, url, name, token, clients=2, body=b"load"):
        self.results: list[tuple[int, object]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(url, name, token, body), daemon=True)
                        for _ in range(clients)]

    def _run(self, url, name, token, body):
        while not self.stop.is_set():
            try:
                status, out, _ = infer(url, name, token, body)
            except OSError as e:
                status, out = 0, str(e)
            self.results.append((status, out))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def failures(self):
        return [r for r in self.results if r[0] != 200]


@pytest.fixture
def models():
    """Toy model folders in alice's part of the shared filesystem: v1, v2, broken."""
    pw = pwd.getpwnam("alice")
    root = SHARED_ROOT / "users" / "alice" / ("svc-test-%s" % uuid.uuid4().hex[:8])
    out = {}
    for version in ("1", "2", "broken"):
        d = root / version
        shutil.copytree(TOY, d, ignore=shutil.ignore_patterns("__pycache__"))
        (d / "VERSION").write_text(version + "\n")
        out[version] = str(d)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(n, pw.pw_uid, pw.pw_gid)
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def services(live_portal):
    """Names of services a test deployed: deleted at teardown, and every replica job of
    theirs cancelled by id (whatever the controller managed by then)."""
    names: list[str] = []
    yield names
    for name in names:
        api_call(live_portal, "DELETE", "/services/%s" % name, live_portal.tokens["alice"])
    with Session(live_portal.engine) as db:
        ids = [r.slurm_job_id for s in db.exec(select(Service).where(Service.name.in_(names)))
               for r in db.exec(select(ServiceReplica).where(ServiceReplica.service_id == s.id)) if r.slurm_job_id]
    deadline = time.monotonic() + 30
    while names and time.monotonic() < deadline:
        with Session(live_portal.engine) as db:
            if not db.exec(select(Service).where(Service.name.in_(names))).first():
                break
        time.sleep(0.5)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30, check=False)


def deploy(portal, services, token, name, **body):
    services.append(name)
    status, svc = api_call(portal, "POST", "/services", token, {"name": name, **body})
    assert status == 201, svc
    return svc


def wait_for(portal, token, name, check, timeout=90, what="condition"):
    deadline = time.monotonic() + timeout
    svc = None
    while time.monotonic() < deadline:
        status, svc = api_call(portal, "GET", "/services/%s" % name, token)
        assert status == 200, svc
        if check(svc):
            return svc
        time.sleep(0.3)
    raise AssertionError("service %s: no %s after %ss: %s" % (name, what, timeout, json.dumps(svc, indent=1)))


def routed(portal, token, name, timeout=10):
    """Wait until the router serves the service: the API says READY at once, the router's table
    follows within router_refresh_s (before that it answers 503 no_ready_replica)."""
    deadline = time.monotonic() + timeout
    while True:
        status, out, _ = infer(portal.service_url, name, token, b"routed?")
        if status == 200:
            return
        assert status == 503 and time.monotonic() < deadline, (status, out)
        time.sleep(0.05)


def ready(n, version=None):
    return lambda s: s["ready_replicas"] >= n and (version is None or all(
        r["version"] == version for r in s["replicas"] if r["phase"] == "READY"))


def test_a_service_answers_curl_shares_load_survives_a_killed_replica_and_a_portal_restart(
        live_portal, base_image, models, services):
    alice, bob = live_portal.tokens["alice"], live_portal.tokens["bob"]
    name = "toy-%s" % uuid.uuid4().hex[:6]
    deploy(live_portal, services, alice, name, image=str(base_image), model=models["1"], replicas=2,
           max_body_bytes=1000, max_wait_ms=2)
    t0 = time.monotonic()
    svc = wait_for(live_portal, alice, name, ready(2), what="2 ready replicas")
    print("2 replicas ready in %.1fs" % (time.monotonic() - t0))
    routed(live_portal, alice, name)
    assert all(r["slurm_job_id"] and 7000 <= r["port"] <= 7999 for r in svc["replicas"])
    jobs = [r["slurm_job_id"] for r in svc["replicas"]]
    info = subprocess.run(["scontrol", "show", "job", jobs[0]], capture_output=True, text=True).stdout
    assert "Partition=infer" in info and "TimeLimit=UNLIMITED" in info and "UserId=alice" in info

    # curl -X POST .../service/NAME -T file
    sample = Path(models["1"]) / "cat.txt"
    sample.write_text("a cat")
    res = subprocess.run(["curl", "-sS", "-X", "POST", "-H", "Authorization: Bearer " + alice, "-T", str(sample),
                          "%s/service/%s" % (live_portal.service_url, name)], capture_output=True, text=True, timeout=30)
    answer = json.loads(res.stdout)
    assert answer["upper"] == "A CAT" and answer["version"] == "1", res

    # the replicas themselves answer only the router (the service's key): a direct request gets
    # 401; readiness stays open
    for r in svc["replicas"]:
        direct = "http://%s:%d" % (r["host"], r["port"])
        for path, data in (("/service", b"x"), ("/stats", None)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(direct + path, data=data), timeout=10)
            with e.value:
                assert e.value.code == 401 and json.loads(e.value.read())["error"] == "unauthorized", (r, path)
        with urllib.request.urlopen(direct + "/healthz", timeout=10) as resp:
            assert resp.status == 200
    # the key is in each replica's runtime.json (0600, alice's) and nowhere in its job log
    with Session(live_portal.engine) as db:
        key = SecretBox(tomllib.loads(live_portal.config.read_text())["data_key"]).open(
            db.exec(select(Service).where(Service.name == name)).one().key_sealed)
        job_dirs = [Path(db.get(ServiceReplica, r["id"]).job_dir) for r in svc["replicas"]]
    for job_dir in job_dirs:
        cfg = job_dir / "run" / "runtime.json"
        assert json.loads(cfg.read_text())["key"] == key and cfg.stat().st_mode & 0o777 == 0o600
        assert cfg.stat().st_uid == pwd.getpwnam("alice").pw_uid
        logs = [p.read_text(errors="replace") for p in (job_dir / "logs").iterdir() if p.is_file()]
        assert logs and not any(key in text for text in logs)

    # each replica's log through the API (by number and by the id's start) and the CLI, to its
    # owner only; the key is not in it
    first = svc["replicas"][0]
    for ref in ("0", first["id"][:8], first["id"]):
        status, text = api_call(live_portal, "GET", "/services/%s/replicas/%s/log" % (name, ref), alice)
        assert status == 200 and b"listening on" in text and key.encode() not in text, (ref, status, text[-500:])
    status, out = api_call(live_portal, "GET", "/services/%s/replicas/0/log" % name, bob)
    assert status == 404, out
    status, out = api_call(live_portal, "GET", "/services/%s/replicas/7/log" % name, alice)
    assert status == 404 and "has no replica '7'; it has 2" in out["message"], out
    env = dict(os.environ, AIPORTAL_URL=live_portal.url, AIPORTAL_TOKEN=alice)
    aiportal = str(Path(sys.executable).parent / "aiportal")
    cli = subprocess.run([aiportal, "service", "logs", name, "--replica", "1"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert cli.returncode == 0 and "listening on" in cli.stdout, cli
    # -f follows the replica while it runs (stopped here after its first lines)
    follow = subprocess.Popen([aiportal, "service", "logs", name, "-f"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        got = ""
        deadline = time.monotonic() + 30
        while "listening on" not in got and time.monotonic() < deadline:
            got += follow.stdout.readline()
        assert "listening on" in got, got
    finally:
        follow.kill()
        follow.wait(10)
        follow.stdout.close()

    # two replicas share the load
    seen = Counter()
    for i in range(20):
        status, out, headers = infer(live_portal.service_url, name, alice, b"x%d" % i, method="PUT")
        assert status == 200 and out["upper"] == "X%d" % i
        seen[headers["X-Replica"]] += 1
    assert len(seen) == 2 and min(seen.values()) >= 5, seen

    # clear errors: no token, another user's service, an unknown service, too big, malformed
    status, out, headers = infer(live_portal.service_url, name, None, b"x")
    assert status == 401 and "Authorization: Bearer" in out["message"] and headers["WWW-Authenticate"]
    status, out, _ = infer(live_portal.service_url, name, "not-a-token", b"x")
    assert status == 401 and out["error"] == "unauthorized"
    for token, svc_name in ((bob, name), (alice, "no-such-service")):
        status, out, _ = infer(live_portal.service_url, svc_name, token, b"x")
        assert status == 404 and out["error"] == "unknown_service" and svc_name in out["message"]
    status, out, _ = infer(live_portal.service_url, name, alice, b"x" * 2000)
    assert status == 413 and "1000" in out["message"]
    status, out, _ = infer(live_portal.service_url, name, alice, b"fail")
    assert status == 500 and out["error"] == "model_error"
    host, port = live_portal.service_url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(("POST /service/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
                   % (name, alice)).encode())
        raw = s.recv(65536)
    assert raw.split(b" ", 2)[1] == b"411", raw[:300]
    req = urllib.request.Request("%s/service/%s" % (live_portal.service_url, name), headers={"Authorization": "Bearer " + alice})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405
    e.value.close()
    assert api_call(live_portal, "GET", "/services/%s" % name, alice)[1]["ready_replicas"] == 2

    # kill one replica's job: the service keeps answering, a new replica comes up
    victim = svc["replicas"][0]
    with Load(live_portal.service_url, name, alice, clients=2) as load:
        time.sleep(0.5)
        subprocess.run(["scancel", victim["slurm_job_id"]], check=True, timeout=30)
        t0 = time.monotonic()
        svc = wait_for(live_portal, alice, name, lambda s: s["ready_replicas"] == 2 and victim["id"] not in
                       [r["id"] for r in s["replicas"]], timeout=90, what="a replacement replica")
        print("replacement ready %.1fs after the kill" % (time.monotonic() - t0))
        time.sleep(0.5)
    assert load.failures() == [] and len(load.results) > 20, (load.failures()[:5], len(load.results))
    with Session(live_portal.engine) as db:
        assert db.get(ServiceReplica, victim["id"]).phase.value == "ENDED"

    # a portal restart: a fresh router process (nothing in memory) on the same database
    # routes at once; endpoints forgotten in the database are read again from endpoint.json
    with Session(live_portal.engine) as db:
        rows = db.exec(select(ServiceReplica).where(ServiceReplica.phase == Phase.READY)).all()
        for r in rows:
            r.host, r.port = None, None
            db.add(r)
        db.commit()
    wait_for(live_portal, alice, name, lambda s: all(r["port"] for r in s["replicas"] if r["phase"] == "READY")
             and s["ready_replicas"] == 2, timeout=20, what="endpoints read again")
    port = free_port([p for p in range(9110, 9150) if "127.0.0.1:%d" % p not in (live_portal.url,
                                                                                  live_portal.service_url)])
    proc = start_router(dict(os.environ, AIPORTAL_CONFIG=str(live_portal.config)), port,
                        live_portal.config.parent / ("router-%d.log" % port))
    try:
        status, out, _ = infer("http://127.0.0.1:%d" % port, name, alice, b"after restart")
        assert status == 200 and out["upper"] == "AFTER RESTART"
    finally:
        _stop(proc)


def test_rolling_update_under_load_fails_no_request_and_a_broken_version_keeps_the_old_one(
        live_portal, base_image, models, services):
    alice = live_portal.tokens["alice"]
    name = "roll-%s" % uuid.uuid4().hex[:6]
    deploy(live_portal, services, alice, name, image=str(base_image), model=models["1"], version="1", replicas=1)
    wait_for(live_portal, alice, name, ready(1), what="a ready replica")
    routed(live_portal, alice, name)
    with Load(live_portal.service_url, name, alice, clients=2) as load:
        time.sleep(0.5)
        status, svc = api_call(live_portal, "POST", "/services/%s/update" % name, alice, {"model": models["2"], "version": "2"})
        assert status == 202 and svc["state"] == "UPDATING", svc
        t0 = time.monotonic()
        svc = wait_for(live_portal, alice, name, lambda s: s["state"] == "RUNNING" and s["generation"] == 2
                       and ready(1, "2")(s) and len([r for r in s["replicas"] if r["phase"] != "ENDED"]) == 1,
                       timeout=90, what="rollout to version 2")
        print("rolled out in %.1fs" % (time.monotonic() - t0))
        time.sleep(1.0)
    versions = Counter(out["version"] for status, out in load.results if status == 200)
    assert load.failures() == [], load.failures()[:5]
    assert versions["1"] > 0 and versions["2"] > 0, versions
    assert svc["version"] == "2" and "rolled out" in svc["message"]

    # a version that cannot load: the rollout stops and version 2 keeps serving
    with Load(live_portal.service_url, name, alice, clients=1) as load:
        status, svc = api_call(live_portal, "POST", "/services/%s/update" % name, alice,
                          {"model": models["broken"], "version": "3"})
        assert status == 202
        svc = wait_for(live_portal, alice, name, lambda s: s["state"] == "RUNNING" and "failed" in s["message"],
                       timeout=90, what="a failed rollout")
    assert load.failures() == [] and {out["version"] for _, out in load.results} == {"2"}
    assert svc["version"] == "2" and svc["generation"] == 2 and "did not start" in svc["message"], svc
    status, out, _ = infer(live_portal.service_url, name, alice, b"still")
    assert status == 200 and out["version"] == "2"


def test_scales_up_under_load_and_down_when_idle(live_portal, base_image, models, services):
    alice = live_portal.tokens["alice"]
    name = "scale-%s" % uuid.uuid4().hex[:6]
    deploy(live_portal, services, alice, name, image=str(base_image), model=models["1"], min_replicas=1,
           max_replicas=2, target_inflight=1.0, scale_down_delay_s=3, max_batch_size=1)
    wait_for(live_portal, alice, name, ready(1), what="a ready replica")
    routed(live_portal, alice, name)
    with Load(live_portal.service_url, name, alice, clients=4, body=b"sleep:0.2") as load:
        t0 = time.monotonic()
        svc = wait_for(live_portal, alice, name, ready(2), timeout=90, what="a second replica under load")
        print("scaled up in %.1fs" % (time.monotonic() - t0))
    assert svc["desired_replicas"] == 2 and load.failures() == []
    t0 = time.monotonic()
    svc = wait_for(live_portal, alice, name, lambda s: s["desired_replicas"] == 1 and s["ready_replicas"] == 1
                   and len([r for r in s["replicas"] if r["phase"] != "ENDED"]) == 1, timeout=60,
                   what="scale down when idle")
    print("scaled down %.1fs after the load stopped" % (time.monotonic() - t0))
    status, out, _ = infer(live_portal.service_url, name, alice, b"idle")
    assert status == 200


def test_a_gray_release_splits_requests_by_weight_then_rolls_out_without_failures(live_portal, base_image, models,
                                                                                   services):
    alice = live_portal.tokens["alice"]
    name = "gray-%s" % uuid.uuid4().hex[:6]
    deploy(live_portal, services, alice, name, image=str(base_image), model=models["1"], replicas=1)
    wait_for(live_portal, alice, name, ready(1), what="a ready replica")
    routed(live_portal, alice, name)
    with Load(live_portal.service_url, name, alice, clients=2) as load:
        status, svc = api_call(live_portal, "POST", "/services/%s/update" % name, alice,
                          {"model": models["2"], "version": "2", "weight": 25})
        assert status == 202 and svc["next_weight"] == 25, svc
        svc = wait_for(live_portal, alice, name, ready(2), timeout=90, what="the canary beside version 1")
        time.sleep(1.5)         # the router's table is re-read every router_refresh_s
        versions = Counter(infer(live_portal.service_url, name, alice, b"x%d" % i)[1]["version"] for i in range(200))
        assert len([r for r in svc["replicas"] if r["phase"] != "ENDED"]) == 2     # nothing was replaced
        # weight 100: the canary counts as the new version's first replica; the old one drains
        status, svc = api_call(live_portal, "POST", "/services/%s/update" % name, alice, {"weight": 100})
        assert status == 202 and svc["next_weight"] is None
        svc = wait_for(live_portal, alice, name, lambda s: s["state"] == "RUNNING" and s["version"] == "2"
                       and s["ready_replicas"] == 1, timeout=90, what="the rollout of version 2")
        time.sleep(1)
    # the clients' requests (2 more threads) share the router: its split is exact per pick, so
    # the sequential sample lands near 25 %
    assert 30 <= versions["2"] <= 70 and versions["1"] + versions["2"] == 200, versions
    assert load.failures() == [] and len(load.results) > 50, (load.failures()[:5], len(load.results))
    assert "rolled out" in svc["message"]
