"""The serving runtime as a real process on loopback with the toy model: readiness, batching,
per-request model errors, limits and malformed requests, draining on SIGTERM, the key."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import pytest

from inference.runtime import ConfigError, encode_result, load_config
from tests.inference.conftest import TOY

KEY = "Zk3-_" + "q" * 38          # as secrets.token_urlsafe(32) makes them: 43 characters


def call(rep, method="POST", path="/service", body=b"hello", headers=None, timeout=20):
    conn = http.client.HTTPConnection(rep.host, rep.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.getheader("Content-Type"), data
    finally:
        conn.close()


def test_ready_only_after_the_model_loaded_and_endpoint_names_host_port_version_job(runtimes):
    rep = runtimes(wait_ready=False, env={"TOY_LOAD_DELAY": "1.0"})
    status, _, body = call(rep, "GET", "/healthz")
    assert status == 503 and json.loads(body)["status"] == "loading"
    assert call(rep, body=b"x")[0] == 503
    ep = json.loads(rep.endpoint_file.read_text())
    assert (ep["host"], ep["port"], ep["version"], ep["job_id"]) == ("127.0.0.1", rep.port, "v1", "4242")
    assert 9150 <= ep["port"] <= 9199
    deadline = time.monotonic() + 10
    while call(rep, "GET", "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, ctype, body = call(rep, "PUT", body=b"cat")
    assert status == 200 and ctype == "application/json" and json.loads(body)["upper"] == "CAT"


def test_post_and_put_answer_each_request_with_its_own_result(runtimes):
    rep = runtimes()
    for method in ("POST", "PUT"):
        status, ctype, body = call(rep, method, body=b"abc")
        assert status == 200 and json.loads(body)["upper"] == "ABC"
    status, ctype, body = call(rep, body=b"bytes")
    assert status == 200 and ctype == "application/octet-stream" and body == b"\x00\x01raw"
    status, _, body = call(rep, body=b"")
    assert status == 200 and json.loads(body)["upper"] == ""


def test_concurrent_requests_are_batched_and_answered_in_order(runtimes):
    rep = runtimes(max_batch_size=8, max_wait_ms=100)
    results = {}

    def one(i):
        results[i] = call(rep, body=("req-%d" % i).encode())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sizes = []
    for i, (status, _, body) in results.items():
        out = json.loads(body)
        assert status == 200 and out["upper"] == "REQ-%d" % i      # its own answer, not a neighbour's
        sizes.append(out["batch_size"])
    assert len(results) == 16 and max(sizes) > 1 and max(sizes) <= 8
    stats = json.loads(call(rep, "GET", "/stats")[2])
    assert stats["items_total"] == 16 and stats["batches_total"] < 16 and stats["in_flight"] == 0


def test_a_model_error_fails_only_its_own_request(runtimes):
    rep = runtimes(max_batch_size=8, max_wait_ms=150)
    results = {}

    def one(i, text):
        results[i] = call(rep, body=text.encode())
    texts = ["ok-%d" % i for i in range(5)] + ["fail"]
    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(texts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    status, ctype, body = results[5]
    assert status == 500 and json.loads(body) == {
        "error": "model_error", "message": "the model failed on this request: ValueError: asked to fail"}
    for i in range(5):
        assert results[i][0] == 200 and json.loads(results[i][2])["upper"] == "OK-%d" % i
    assert call(rep, "GET", "/healthz")[0] == 200


def _raw(rep, data: bytes) -> bytes:
    with socket.create_connection((rep.host, rep.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n", b"413"),
    (b"POST /service HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"411"),
    (b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nConnection: close\r\n\r\n", b"400"),
    (b"POST /service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n", b"400"),
    (b"POST /service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n", b"400"),
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b"404"),
    (b"DELETE /service HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
    (b"GET /service HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
])
def test_malformed_and_oversized_requests_get_4xx_and_the_replica_lives_on(runtimes, request_bytes, status):
    rep = runtimes(max_body_bytes=1000)
    answer = _raw(rep, request_bytes)
    # a request line that is not HTTP at all gets an HTTP/0.9-style answer (no status line)
    assert answer.split(b" ", 2)[1] == status or b"Error code: " + status in answer, answer[:200]
    assert call(rep, "GET", "/healthz")[0] == 200
    assert call(rep, body=b"still here")[0] == 200


def test_chunked_bodies_and_the_size_limit_on_them(runtimes):
    rep = runtimes(max_body_bytes=1000)
    ok = _raw(rep, b"PUT /service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert b" 200 " in ok.split(b"\r\n")[0] + b" " and b'"ABCDE"' in ok
    big = _raw(rep, b"PUT /service HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                    + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
    assert big.split(b" ", 2)[1] == b"413"


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits(runtimes):
    rep = runtimes()
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=call(rep, body=b"sleep:1.0")))
    t.start()
    time.sleep(0.3)
    rep.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        status = call(rep, body=b"late")[0]
    except OSError:
        status = "refused"
    assert status in (503, "refused")
    t.join(10)
    assert slow["r"][0] == 200
    assert rep.proc.wait(10) == 0
    assert not rep.endpoint_file.exists()


def test_the_runtime_serves_as_deployed_one_file_alone_with_the_standard_library_only(tmp_path):
    """A replica runs the portal's copy of runtime.py, bound alone at /aiportal/runtime.py, with
    the image's python: nothing of the repository or its virtualenv may be needed. ``-I -S``
    leaves the script's folder, site-packages and the environment off sys.path."""
    import shutil

    from tests.inference.conftest import RUNTIME, start_runtime, stop_runtime
    alone = tmp_path / "aiportal"
    alone.mkdir()
    shutil.copyfile(RUNTIME, alone / "runtime.py")
    rep = start_runtime(tmp_path / "run", runtime=alone / "runtime.py", python_flags=("-I", "-S"))
    try:
        status, ctype, data = call(rep, body=b"alone")
        assert status == 200 and json.loads(data)["upper"] == "ALONE", data
    finally:
        stop_runtime(rep)


def test_a_model_that_fails_to_load_exits_and_leaves_no_endpoint(tmp_path):
    import shutil
    import subprocess
    import sys
    model = tmp_path / "model"
    shutil.copytree(TOY, model)
    (model / "VERSION").write_text("broken\n")
    from tests.inference.conftest import RUNTIME
    cfg = tmp_path / "runtime.json"
    cfg.write_text(json.dumps({"model_file": "model.py", "model_dir": str(model), "port_range": [9150, 9199],
                               "endpoint_file": str(tmp_path / "endpoint.json")}))
    res = subprocess.run([sys.executable, str(RUNTIME), "--config", str(cfg)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 4 and "broken on purpose" in res.stderr
    assert not (tmp_path / "endpoint.json").exists()


@pytest.mark.parametrize("headers", [
    {}, {"X-Aiportal-Key": "wrong-" + KEY}, {"X-Aiportal-Key": KEY[:-1]}, {"X-Aiportal-Key": KEY + "x"},
    {"X-Aiportal-Key": ""}, {"X-Aiportal-Key": "é" * 43}, {"X-Other": KEY},
], ids=["none", "wrong", "prefix", "longer", "empty", "latin-1", "other-header"])
def test_with_a_key_service_and_stats_refuse_requests_without_it(runtimes, headers):
    rep = runtimes(key=KEY)
    conn = http.client.HTTPConnection(rep.host, rep.port, timeout=10)
    for method, path in (("POST", "/service"), ("PUT", "/service"), ("GET", "/stats")):
        conn.request(method, path, body=b"x" * 100 if method != "GET" else None, headers=headers)
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 401 and out["error"] == "unauthorized" and "router" in out["message"], out
        assert KEY not in json.dumps(out)
    # the refused body was read: the same connection carries the next request
    conn.request("POST", "/service", body=b"cat", headers={"X-Aiportal-Key": KEY})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["upper"] == "CAT"
    conn.close()


def test_with_a_key_healthz_stays_open_and_the_key_opens_service_and_stats(runtimes):
    rep = runtimes(key=KEY)
    status, _, body = call(rep, "GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    for method in ("POST", "PUT"):
        status, _, body = call(rep, method, body=b"abc", headers={"X-Aiportal-Key": KEY})
        assert status == 200 and json.loads(body)["upper"] == "ABC"
    assert call(rep, body=b"nope")[0] == 401
    status, _, body = call(rep, "GET", "/stats", headers={"x-aiportal-key": KEY})      # header names: any case
    assert status == 200 and json.loads(body)["requests_total"] == 2       # refused requests are not counted
    # a refused body over the limit is not read: 401, and the connection ends
    answer = _raw(rep, b"POST /service HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"401" and b"Connection: close" in answer
    assert call(rep, body=b"still", headers={"X-Aiportal-Key": KEY})[0] == 200
    # the key is in memory only: not in the log, not in the endpoint file
    assert KEY not in rep.endpoint_file.read_text()
    rep.proc.send_signal(signal.SIGTERM)
    assert rep.proc.wait(15) == 0
    assert KEY not in rep.log.read_text() and "listening on" in rep.log.read_text()


def test_without_a_key_the_runtime_answers_everyone(runtimes):
    rep = runtimes()
    assert call(rep, body=b"abc")[0] == 200
    assert call(rep, body=b"abc", headers={"X-Aiportal-Key": KEY})[0] == 200     # a key it does not have: ignored
    assert call(rep, "GET", "/stats")[0] == 200


@pytest.mark.parametrize("raw, words", [
    ({}, "exactly one of model_file"),
    ({"model_file": "m.py", "model_module": "m"}, "exactly one of model_file"),
    ({"model_file": "m.py", "class_name": "not a class"}, "class_name"),
    ({"model_file": "m.py", "max_batch_size": 0}, "max_batch_size"),
    ({"model_file": "m.py", "max_batch_size": True}, "max_batch_size"),
    ({"model_file": "m.py", "max_wait_ms": -1}, "max_wait_ms"),
    ({"model_file": "m.py", "port_range": [8000, 7000]}, "port_range"),
    ({"model_file": "m.py", "port_range": [0, 10]}, "port_range"),
    ({"model_file": "m.py", "typo": 1}, "unknown config keys"),
    ({"model_file": "m.py", "key": "short-secret"}, "key must be"),
    ({"model_file": "m.py", "key": "with a space in it, a secret"}, "key must be"),
    ({"model_file": "m.py", "key": "line\nbreak-in-the-secret"}, "key must be"),
    ({"model_file": "m.py", "key": 12345678901234567890}, "key must be"),
])
def test_config_errors_name_the_key(raw, words):
    with pytest.raises(ConfigError, match=words) as e:
        load_config(raw)
    assert "secret" not in str(e.value)            # a bad key's value is never shown


@pytest.mark.parametrize("result, body, ctype", [
    (b"ab", b"ab", "application/octet-stream"),
    ("é", "é".encode(), "text/plain; charset=utf-8"),
    ({"label": "cat"}, b'{"label": "cat"}\n', "application/json"),
    ([1, 2], b"[1, 2]\n", "application/json"),
])
def test_results_are_encoded_by_type(result, body, ctype):
    assert encode_result(result) == (body, ctype)
