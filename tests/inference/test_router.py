"""The router's core against real runtime processes on loopback: least outstanding requests,
retries on a dead or draining replica, clear errors when none can answer."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from inference.errors import NoReadyReplica, ReplicaUnreachable
from inference.router import Router, Target


def send(router, targets, body=b"hi", method="POST"):
    up = router.forward(targets, method, body, {"Content-Type": "text/plain"}, service="toy")
    data = b"".join(up.body())
    return up.status, up.headers, json.loads(data), up.target.key


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # closed again: nothing listens there


def test_sequential_requests_alternate_and_connections_are_kept_alive(runtimes):
    a, b = runtimes("a"), runtimes("b")
    targets = [Target("a", a.host, a.port, "v1"), Target("b", b.host, b.port, "v1")]
    router = Router()
    keys = [send(router, targets)[3] for _ in range(10)]
    assert keys.count("a") == 5 and keys.count("b") == 5
    status, headers, out, _ = send(router, targets, b"abc", "PUT")
    assert status == 200 and out["upper"] == "ABC" and headers["X-Model-Version"] == "v1"
    assert router.outstanding("a") == router.outstanding("b") == 0
    assert len(router._pool()) == 2            # one idle keep-alive connection per replica


def test_least_outstanding_requests_spread_concurrent_load(runtimes):
    a, b = runtimes("a", max_batch_size=1), runtimes("b", max_batch_size=1)
    targets = [Target("a", a.host, a.port), Target("b", b.host, b.port)]
    router = Router()
    got = []
    threads = [threading.Thread(target=lambda: got.append(send(router, targets, b"sleep:0.3")[3])) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(20)
    assert sorted(got) == ["a"] * 3 + ["b"] * 3


def test_a_dead_replica_is_skipped_and_ejected(runtimes):
    a = runtimes("a")
    targets = [Target("dead", "127.0.0.1", dead_port()), Target("a", a.host, a.port)]
    router = Router()
    for _ in range(4):
        assert send(router, targets)[3] == "a"
    assert router.pick(targets).key == "a"     # ejected for eject_s


def test_a_draining_replica_answers_503_and_the_request_goes_elsewhere(runtimes):
    a, b = runtimes("a"), runtimes("b")
    targets = [Target("a", a.host, a.port), Target("b", b.host, b.port)]
    router = Router()
    slow = threading.Thread(target=lambda: send(router, [targets[0]], b"sleep:1.5"))
    slow.start()
    time.sleep(0.3)
    a.proc.send_signal(signal.SIGTERM)          # a drains: its slow request finishes, new ones get 503
    time.sleep(0.2)
    for _ in range(6):
        assert send(router, targets)[0] == 200
    slow.join(10)


def test_no_replica_and_no_answer_are_clear_errors():
    router = Router(connect_timeout=1)
    with pytest.raises(NoReadyReplica, match="no ready replica"):
        router.forward([], "POST", b"", {}, service="toy")
    with pytest.raises(ReplicaUnreachable, match="no replica answered"):
        router.forward([Target("x", "127.0.0.1", dead_port()), Target("y", "127.0.0.1", dead_port())], "POST", b"",
                       {}, service="toy")
    assert router.outstanding("x") == router.outstanding("y") == 0
