"""The inference gateway (``POST|PUT /service/NAME``) against real runtime processes on
loopback: balancing, keep-alive, retries on a dead or draining replica, weights between
versions, the service's key on the way to its replicas, and clear errors for every refused
request."""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from inference.gateway import Route, parse_head
from inference.gateway.http1 import discard, discard_chunked
from inference.balancer import Balancer, Target
from tests.inference.conftest import StaticDirectory

TOKEN = "alice-token"


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # closed again: nothing listens there


def post(gw, name="toy", body=b"hi", token=TOKEN, method="POST", headers=None, conn=None):
    """(status, headers, parsed body) of one request; ``conn`` keeps a connection alive."""
    c = conn or http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    hdrs = {"Content-Type": "text/plain", **({"Authorization": "Bearer " + token} if token else {}), **(headers or {})}
    c.request(method, "/service/" + name, body=body, headers=hdrs)
    r = c.getresponse()
    raw = r.read()
    if conn is None:
        c.close()
    out = json.loads(raw) if r.getheader("Content-Type", "").startswith("application/json") else raw
    return r.status, r, out


def answered_by(gw, conn, n: int) -> Counter:
    """Send ``n`` requests on ``conn``; how many each replica (X-Replica) answered, each answer
    being its own request's."""
    replicas = Counter()
    for i in range(n):
        status, r, out = post(gw, body=b"x%d" % i, conn=conn)
        assert status == 200 and out["upper"] == "X%d" % i
        replicas[r.getheader("X-Replica")] += 1
    return replicas


def raw_exchange(gw, data: bytes, timeout=10) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except TimeoutError:
                break
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)


def route(*targets, max_body=0):
    return {"toy": (TOKEN, Route("toy", tuple(targets), max_body))}


def test_sequential_requests_alternate_over_one_kept_alive_connection_each(runtimes, gateways):
    a, b = runtimes("a"), runtimes("b")
    gw = gateways(StaticDirectory(route(Target("a" * 12, a.host, a.port, "v1"), Target("b" * 12, b.host, b.port, "v1"))))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    assert answered_by(gw, conn, 10) == {"a" * 8: 5, "b" * 8: 5}
    status, r, out = post(gw, body=b"abc", method="PUT", conn=conn)
    assert status == 200 and out["upper"] == "ABC" and r.getheader("X-Model-Version") == "v1"
    assert gw.gateway.balancer.outstanding("a" * 12) == gw.gateway.balancer.outstanding("b" * 12) == 0
    # one idle keep-alive connection per replica: no new TCP connection per request
    assert sorted(len(v) for v in gw.gateway.upstreams.idle.values()) == [1, 1]
    status, _, out = post(gw, body=b"bytes")
    assert status == 200 and out == b"\x00\x01raw"
    status, _, out = post(gw, body=b"fail")
    assert status == 500 and out["error"] == "model_error"      # the replica's own answer, passed on


def test_least_outstanding_requests_spread_concurrent_load(runtimes, gateways):
    a, b = runtimes("a", max_batch_size=1), runtimes("b", max_batch_size=1)
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port), Target("b", b.host, b.port))))
    got = []
    threads = [threading.Thread(target=lambda: got.append(post(gw, body=b"sleep:0.3")[1].getheader("X-Replica")))
               for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(20)
    assert sorted(got) == ["a"] * 3 + ["b"] * 3


def test_a_dead_replica_is_skipped_and_ejected(runtimes, gateways):
    a = runtimes("a")
    gw = gateways(StaticDirectory(route(Target("dead", "127.0.0.1", dead_port()), Target("a", a.host, a.port))))
    for _ in range(4):
        status, r, _ = post(gw)
        assert status == 200 and r.getheader("X-Replica") == "a"
    assert gw.gateway.balancer._ejected.get("dead", 0) > time.monotonic()


def test_a_draining_replica_answers_503_and_the_request_goes_elsewhere(runtimes, gateways):
    a, b = runtimes("a"), runtimes("b")
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port), Target("b", b.host, b.port))))
    for _ in range(4):          # both have an idle kept-alive connection now
        assert post(gw)[0] == 200
    slow = threading.Thread(target=lambda: post(gw, body=b"sleep:1.5"))
    slow.start()
    time.sleep(0.3)
    victim = a if gw.gateway.balancer.outstanding("a") else b
    victim.proc.send_signal(signal.SIGTERM)     # it drains: the slow request finishes, new ones get 503
    time.sleep(0.2)
    for _ in range(6):
        assert post(gw)[0] == 200
    slow.join(10)


def test_a_replica_that_does_not_answer_in_time_gets_504_and_the_request_is_not_sent_again(runtimes, gateways):
    a, b = runtimes("a", max_batch_size=1), runtimes("b", max_batch_size=1)
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port), Target("b", b.host, b.port))), timeout=0.5)
    t0 = time.monotonic()
    status, _, out = post(gw, body=b"sleep:2")
    assert status == 504 and out["error"] == "replica_timeout" and "0.5" not in out["message"]
    assert time.monotonic() - t0 < 1.5           # not retried on the other replica
    assert gw.gateway.balancer.outstanding("a") == gw.gateway.balancer.outstanding("b") == 0


KEY = "Zk3-_" + "q" * 38


def test_the_routes_key_opens_keyed_replicas_and_a_route_without_it_gets_their_401(runtimes, gateways, caplog):
    caplog.set_level(logging.DEBUG)
    a, b = runtimes("a", key=KEY), runtimes("b", key=KEY)
    targets = (Target("a", a.host, a.port, "v1"), Target("b", b.host, b.port, "v1"))
    keyed = Route("toy", targets, key=KEY)
    assert KEY not in repr(keyed)
    gw = gateways(StaticDirectory({"toy": (TOKEN, keyed), "nokey": (TOKEN, Route("nokey", targets))}))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    assert answered_by(gw, conn, 6) == {"a": 3, "b": 3}
    # without the route's key the replicas refuse, and their 401 comes back as it is; a key the
    # client sends itself is not passed on
    for headers in ({}, {"X-Aiportal-Key": KEY}):
        status, _, out = post(gw, name="nokey", headers=headers)
        assert status == 401 and out["error"] == "unauthorized" and "router" in out["message"]
    assert post(gw, conn=conn)[0] == 200        # the keyed route is not hurt by that
    conn.close()
    assert KEY not in caplog.text


def test_no_ready_replica_and_no_answer_are_clear_errors(gateways):
    gw = gateways(StaticDirectory({"toy": (TOKEN, Route("toy", ())),
                                   "gone": (TOKEN, Route("gone", (Target("x", "127.0.0.1", dead_port()),
                                                                  Target("y", "127.0.0.1", dead_port()))))}),
                  connect_timeout=1)
    status, r, out = post(gw)
    assert status == 503 and out["error"] == "no_ready_replica" and r.getheader("Retry-After") == "1"
    assert "aiportal service show toy" in out["message"]
    status, r, out = post(gw, name="gone")
    assert status == 502 and out["error"] == "replicas_unreachable" and "no replica answered" in out["message"]
    assert gw.gateway.balancer.outstanding("x") == gw.gateway.balancer.outstanding("y") == 0


def test_refused_requests_get_clear_errors_and_keep_alive_survives_the_harmless_ones(runtimes, gateways):
    a = runtimes("a")
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port), max_body=1000)))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    status, r, out = post(gw, token=None, conn=conn)
    assert status == 401 and out["error"] == "unauthorized" and "Bearer" in r.getheader("WWW-Authenticate")
    assert post(gw, token="not-a-token", conn=conn)[0] == 401
    status, _, out = post(gw, name="nope", conn=conn)
    assert status == 404 and out["error"] == "unknown_service" and "'nope'" in out["message"]
    assert post(gw, token="other-user", conn=conn)[0] == 404           # another user's service: not found
    status, r, out = post(gw, method="GET", body=None, conn=conn)
    assert status == 405 and r.getheader("Allow") == "POST, PUT"
    assert post(gw, conn=conn)[0] == 200                                # the same connection still serves
    status, r, out = post(gw, body=b"x" * 2000, conn=conn)      # over the limit: its body read and thrown away
    assert status == 413 and "1000" in out["message"] and r.getheader("Connection") is None
    assert post(gw, conn=conn)[0] == 200

    head = "POST /service/toy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % TOKEN
    raw = raw_exchange(gw, (head + "Connection: close\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 411 ") and b"Content-Length" in raw
    raw = raw_exchange(gw, (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"ABCDE"' in raw
    raw = raw_exchange(gw, (head + "Transfer-Encoding: chunked\r\n\r\n" + ("400\r\n" + "y" * 1024 + "\r\n") * 3
                            + "0\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 413 ") and raw.count(b"HTTP/1.1") == 1     # the rest thrown away, then closed
    raw = raw_exchange(gw, b"GARBAGE\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ") and b"malformed request line" in raw
    raw = raw_exchange(gw, b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 404 ") and b"/service/NAME" in raw
    raw = raw_exchange(gw, (head + "Content-Length: abc\r\n\r\n").encode())
    assert raw.startswith(b"HTTP/1.1 400 ") and b"not a number" in raw

    # curl sends "Expect: 100-continue" for big bodies: 100 first, then the answer
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall((head + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode())
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"HELLO"' in answer
    # ... but a refused one gets its error without sending the body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall((head + "Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n").encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 413 ")


def test_a_refused_requests_body_is_read_and_thrown_away_and_the_connection_serves_on(runtimes, gateways):
    """nginx sends the whole body before it reads the answer: a refusal must not close on an
    unread body (nginx then answered its own HTML 502), whatever the body's size."""
    a = runtimes("a")
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port), max_body=1000)), drain_max=8 * 1024 * 1024)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    big = b"x" * (4 * 1024 * 1024)
    for kw, status in (({"token": None}, 401), ({"token": "not-a-token"}, 401), ({"name": "nope"}, 404), ({}, 413),
                       ({"method": "GET"}, 405)):
        got, r, out = post(gw, body=big, conn=conn, **kw)
        assert got == status and r.getheader("Content-Type") == "application/json" and out["error"]
        assert r.getheader("Connection") is None
        assert post(gw, conn=conn)[0] == 200        # the body was read to its end, not taken as a request
    # a chunked one too
    head = "POST /service/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % TOKEN
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(head.encode() + (b"100000\r\n" + b"y" * 0x100000 + b"\r\n") * 3 + b"0\r\n\r\n")
        s.sendall(b"POST /service/toy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: 2\r\n"
                  b"Connection: close\r\n\r\nok" % TOKEN.encode())
        answers = b""
        while chunk := s.recv(65536):
            answers += chunk
    assert answers.startswith(b"HTTP/1.1 404 ") and b"HTTP/1.1 200 " in answers and b'"OK"' in answers
    # over drain_max (nginx sends none: its client_max_body_size is the largest service limit):
    # answered at once, and the connection closed
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /service/toy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (9 * 1024 * 1024))
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in answer


def test_nginx_takes_for_service_no_more_than_the_router_drains_and_refuses_more_in_json():
    """The /service/ location of the portal's nginx template: its client_max_body_size is the
    largest service limit, which is what the gateway drains by default; its own 413 is JSON."""
    import re
    from pathlib import Path

    from inference.gateway import Gateway
    from inference.service import MAX_BODY_BYTES
    text = (Path(__file__).resolve().parents[2] / "ansible/roles/portal/templates/nginx.conf.j2").read_text()
    block = re.search(r"location /service/ \{(.*?)\n        \}", text, re.S).group(1)
    size = re.search(r"client_max_body_size (\d+)([kmg]?);", block)
    assert int(size.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[size.group(2)] == MAX_BODY_BYTES
    assert Gateway(StaticDirectory()).drain_max == MAX_BODY_BYTES
    named = re.search(r"error_page 413 (@\w+);", block).group(1)
    own = re.search(r"location %s \{(.*?)\}\n" % named, text, re.S).group(1)
    assert "default_type application/json;" in own
    answer = json.loads(re.search(r"return 413 '(.*)\\n';", own).group(1))
    assert answer["error"] == "too_large" and str(MAX_BODY_BYTES) in answer["message"]


def discarded(data: bytes, discarding) -> tuple[object, bytes]:
    """(what ``discarding(reader)`` answered, what it left unread) on a stream of ``data``."""
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await discarding(reader), await reader.read()
    return asyncio.run(main())


@pytest.mark.parametrize("data, cap, pending, drained", [
    (b"3\r\nabc\r\n0\r\n\r\n", 10, None, True),
    (b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n", 10, None, True),
    (b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 5, None, True),       # exactly the cap
    (b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 4, None, False),      # one byte over
    (b"abc\r\n0\r\n\r\n", 3, 3, True),                            # the rest of a chunk whose size was read
    (b"abc\r\n0\r\n\r\n", 2, 3, False),
    (b"zz\r\nabc\r\n0\r\n\r\n", 10, None, False),                # malformed sizes
    (b"-3\r\nabc\r\n0\r\n\r\n", 10, None, False),
    (b"0x3\r\nabc\r\n0\r\n\r\n", 10, None, False),
    (b"3\r\nabcX\r\n0\r\n\r\n", 10, None, False),                # chunk longer than its size
])
def test_discard_chunked_reads_to_the_end_of_the_body_within_its_cap(data, cap, pending, drained):
    got, rest = discarded(data + b"NEXT", lambda r: discard_chunked(r, cap, pending))
    assert got is drained
    if drained:         # not a byte of the next request taken
        assert rest == b"NEXT"


def test_discard_reads_exactly_its_count_and_fails_on_a_short_body():
    assert discarded(b"x" * 200_000 + b"NEXT", lambda r: discard(r, 200_000)) == (None, b"NEXT")
    with pytest.raises(asyncio.IncompleteReadError):
        discarded(b"short", lambda r: discard(r, 10))


def test_weights_split_requests_between_two_versions_in_proportion():
    targets = [Target("old1", "h", 1, "1", 90), Target("old2", "h", 2, "1", 90), Target("new", "h", 3, "2", 10)]
    bal = Balancer()
    picks = Counter()
    for _ in range(1000):
        t = bal.pick(targets)
        picks[t.version] += 1
        bal.done(t)
    assert picks == {"1": 900, "2": 100}
    # weight 0: no requests while another version is ready, all of them when it is alone
    targets = [Target("old", "h", 1, "1", 100), Target("new", "h", 2, "2", 0)]
    assert {bal.pick(targets).key for _ in range(20)} == {"old"}
    assert bal.pick(targets, exclude={"old"}).key == "new"


def test_weights_hold_under_concurrency(runtimes, gateways):
    a, b = runtimes("a"), runtimes("b", version="v2")
    gw = gateways(StaticDirectory(route(Target("a", a.host, a.port, "v1", 75), Target("b", b.host, b.port, "v2", 25))))
    got = Counter()
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
        for _ in range(50):
            status, r, _ = post(gw, conn=conn)
            assert status == 200
            with lock:
                got[r.getheader("X-Model-Version")] += 1
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {"v1": 150, "v2": 50}


def test_parse_head_reads_the_request_line_and_headers():
    r = parse_head(b"POST /service/x?debug=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-A: b: c\r\n\r\n")
    assert (r.method, r.path, r.version) == ("POST", "/service/x", "HTTP/1.1")
    assert r.headers == {"host": "a", "content-length": "3", "x-a": "b: c"} and r.keep_alive and r.has_body
    assert not parse_head(b"POST /service/x HTTP/1.0\r\n\r\n").keep_alive
    assert not parse_head(b"POST /service/x HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive
    for bad, code in ((b"POST /x HTTP/2.0\r\n\r\n", 505), (b"POST /x\r\n\r\n", 400),
                      (b"POST /x HTTP/1.1\r\nno colon\r\n\r\n", 400),
                      (b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400)):
        try:
            parse_head(bad)
        except Exception as e:
            assert e.status == code, bad
        else:
            raise AssertionError(bad)


def test_a_failing_directory_gets_503_not_a_dropped_connection(gateways):
    class Broken:
        async def route(self, token, name, client=""):
            raise OSError("database is locked")
    gw = gateways(Broken())
    status, r, out = post(gw)
    assert status == 503 and out["error"] == "unavailable" and r.getheader("Retry-After") == "5"
    assert "database" not in out["message"]         # the cause's type only: no internals to clients
