"""`aiportal submit` and `aiportal service deploy` send an Idempotency-Key and send the request
again with the same key when no answer came (dropped, timed out) or a 502/503/504 or 409
'still being processed' did; other answers and other commands are not retried. Against a small
HTTP server that answers from a script (a real socket, so the CLI's own error paths run)."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")
#: DESIGN.md: tests' own servers use 9100-9199
PORTS = range(9160, 9200)
JOB = {"id": "6f1c0a52-1111-4222-8333-944445555666", "slurm_job_id": "77", "state": "PENDING"}
SERVICE = {"name": "toy", "url": "/service/toy", "state": "RUNNING", "ready_replicas": 0, "desired_replicas": 1,
           "min_replicas": 1, "max_replicas": 1, "target_inflight": 4.0, "generation": 1, "replicas": [],
           "spec": {"version": "1"}}


class ScriptedPortal:
    """Answers each request with the next step of ``steps``: ``"drop"`` (close without an
    answer), ``("slow", seconds)`` (answer nothing for that long, then drop), or ``(status,
    body, headers)``; records (method, path, Idempotency-Key) of every request."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.seen: list[tuple[str, str, str | None]] = []
        portal = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                portal.seen.append((self.command, self.path, self.headers.get("Idempotency-Key")))
                step = portal.steps.pop(0) if portal.steps else (500, {"error": "internal", "message": "no step"}, {})
                if step == "drop" or step[0] == "slow":
                    if step != "drop":
                        time.sleep(step[1])
                    self.close_connection = True
                    self.connection.close()
                    return
                status, body, headers = step
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        for port in PORTS:
            try:
                self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
                break
            except OSError:
                continue
        else:
            raise AssertionError("no free port in %s-%s" % (PORTS[0], PORTS[-1]))
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def scripted(tmp_path):
    token = tmp_path / "token"
    token.write_text("aip_test")
    servers = []

    def start(*steps):
        servers.append(ScriptedPortal(steps))
        return servers[-1]
    start.token = str(token)
    yield start
    for s in servers:
        s.close()


def cli(portal, token, *args, timeout="5"):
    return subprocess.run([AIPORTAL, "--url", portal.url, "--token-file", token, "--timeout", timeout, *args],
                          capture_output=True, text=True, timeout=120)


SUBMIT = ("submit", "--image", "/x.sif", "--node-type", "1card", "--", "true")


def test_submit_retries_with_one_key_until_it_gets_an_answer(scripted):
    portal = scripted(("slow", 2.0), "drop", (503, {"error": "slurm_unavailable", "message": "slurmctld down"},
                                              {"Retry-After": "0"}),
                      (409, {"error": "idempotency_in_flight", "message": "Idempotency-Key: still being processed"},
                       {"Retry-After": "0"}), (201, JOB, {}))
    res = cli(portal, scripted.token, *SUBMIT, timeout="0.5")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == JOB["id"]
    assert [(m, p) for m, p, _ in portal.seen] == [("POST", "/api/v1/jobs")] * 5
    keys = {k for _, _, k in portal.seen}
    assert len(keys) == 1
    [key] = keys
    assert str(uuid.UUID(key)) == key and uuid.UUID(key).version == 4
    retries = [line for line in res.stderr.splitlines() if "trying again" in line]
    assert len(retries) == 3, res.stderr
    assert "with the same Idempotency-Key %s (try 2 of 5)" % key in retries[0]
    assert "slurmctld down" in retries[2] and "in 0.0 s" in retries[2]
    assert re.search(r"trying again in 1\.0 s", retries[0]) and re.search(r"trying again in 2\.0 s", retries[1])
    assert "still processing the first request with Idempotency-Key %s; asking again in 0.0 s" % key in res.stderr


def test_still_being_processed_is_waited_out_without_using_up_retries(scripted):
    """A portal killed mid-request says 409 'still being processed' until its in-flight time
    has passed; the CLI keeps asking (as Retry-After says), then gets the job."""
    busy = (409, {"error": "idempotency_in_flight", "message": "Idempotency-Key: still being processed"},
            {"Retry-After": "0"})
    portal = scripted(*[busy] * 6, (201, JOB, {}))
    res = cli(portal, scripted.token, "submit", "--retries", "1", *SUBMIT[1:])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == JOB["id"] and len(portal.seen) == 7
    assert res.stderr.count("still processing the first request") == 6 and "trying again" not in res.stderr


def test_each_submit_sends_a_new_key_unless_one_is_given(scripted):
    portal = scripted((201, JOB, {}), (201, JOB, {}), (201, JOB, {}))
    assert cli(portal, scripted.token, *SUBMIT).returncode == 0
    assert cli(portal, scripted.token, *SUBMIT).returncode == 0
    res = cli(portal, scripted.token, "submit", "--idempotency-key", "my-key-1", *SUBMIT[1:])
    assert res.returncode == 0, res.stderr
    first, second, given = (k for _, _, k in portal.seen)
    assert first != second and given == "my-key-1"


@pytest.mark.parametrize("status, body", [
    (422, {"error": "invalid", "message": "node_type: unknown node type", "errors": {"node_type": "unknown"}}),
    (409, {"error": "conflict", "message": "a service named 'toy' exists"}),
    (500, {"error": "internal", "message": "boom"}),
])
def test_other_errors_are_not_retried(scripted, status, body):
    portal = scripted((status, body, {}))
    res = cli(portal, scripted.token, *SUBMIT)
    assert res.returncode == 2 and body["message"] in res.stderr
    assert len(portal.seen) == 1 and "trying again" not in res.stderr


def test_giving_up_names_the_key_to_ask_again_with(scripted):
    portal = scripted(*[(503, {"error": "slurm_unavailable", "message": "slurmctld down"}, {"Retry-After": "0"})] * 3)
    res = cli(portal, scripted.token, "submit", "--retries", "2", *SUBMIT[1:])
    assert res.returncode == 2
    [key] = {k for _, _, k in portal.seen}
    assert len(portal.seen) == 3
    assert "gave up after 3 tries; nothing was made twice" in res.stderr
    assert "run the same command again with --idempotency-key %s" % key in res.stderr


def test_other_requests_are_not_retried(scripted):
    portal = scripted((503, {"error": "slurm_unavailable", "message": "slurmctld down"}, {"Retry-After": "0"}))
    res = cli(portal, scripted.token, "jobs")
    assert res.returncode == 2 and len(portal.seen) == 1
    assert portal.seen[0][2] is None


def test_service_deploy_retries_with_one_key(scripted):
    portal = scripted("drop", (502, {"error": "bad_gateway", "message": "proxy"}, {"Retry-After": "0"}),
                      (201, SERVICE, {}))
    res = cli(portal, scripted.token, "service", "deploy", "toy", "--image", "/x.sif", "--model", "/m")
    assert res.returncode == 0, res.stderr
    assert [(m, p) for m, p, _ in portal.seen] == [("POST", "/api/v1/services")] * 3
    assert len({k for _, _, k in portal.seen}) == 1 and portal.seen[0][2]
    assert res.stderr.count("trying again") == 2
