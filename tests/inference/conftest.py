"""Fixtures for the inference tests: the serving runtime as a subprocess on loopback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from inference.endpoints import read_endpoint

REPO = Path(__file__).resolve().parents[2]
RUNTIME = REPO / "inference" / "runtime.py"
TOY = Path(__file__).resolve().parent / "toy_model"
#: DESIGN.md: tests' extra instances use 9100-9199 (the live portal takes 9110-9149)
RUNTIME_PORTS = [9150, 9199]


@dataclass
class Replica:
    proc: subprocess.Popen
    host: str
    port: int
    endpoint_file: Path
    log: Path

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)


def start_runtime(tmp: Path, model_dir: Path = TOY, wait_ready: bool = True, env: dict | None = None,
                  runtime: Path = RUNTIME, python_flags: tuple[str, ...] = (), **cfg) -> Replica:
    """Start ``runtime`` (default ``inference/runtime.py``) with a config in ``tmp``; wait for
    endpoint.json (and for /healthz 200 with ``wait_ready``). ``python_flags`` go to the
    interpreter (e.g. ``-I`` to run it as a replica does: no repository, no site-packages)."""
    import urllib.request
    tmp.mkdir(parents=True, exist_ok=True)
    config = {"model_file": "model.py", "class_name": "Model", "model_dir": str(model_dir), "port_range": RUNTIME_PORTS,
              "endpoint_file": str(tmp / "endpoint.json"), "version": "v1", "job_id": "4242", **cfg}
    (tmp / "runtime.json").write_text(json.dumps(config))
    log = tmp / "runtime.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *python_flags, str(runtime), "--config", str(tmp / "runtime.json")],
                                stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    deadline = time.monotonic() + 20
    ep = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("runtime exited %s:\n%s" % (proc.returncode, log.read_text()))
        ep = read_endpoint(tmp)
        if ep is not None:
            break
        time.sleep(0.05)
    assert ep is not None, log.read_text()
    rep = Replica(proc, ep.host, ep.port, tmp / "endpoint.json", log)
    while wait_ready and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(rep.url + "/healthz", timeout=2):
                return rep
        except OSError:
            time.sleep(0.05)
    if wait_ready:
        raise AssertionError("runtime not ready:\n%s" % log.read_text())
    return rep


def stop_runtime(rep: Replica) -> None:
    if rep.proc.poll() is None:
        rep.proc.send_signal(signal.SIGTERM)
        try:
            rep.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            rep.proc.kill()
            rep.proc.wait(timeout=5)


@pytest.fixture
def runtimes(tmp_path):
    """A factory of runtime subprocesses, all stopped (by pid) at teardown."""
    started: list[Replica] = []

    def start(name: str = "r", **kw) -> Replica:
        rep = start_runtime(tmp_path / name, **kw)
        started.append(rep)
        return rep
    yield start
    for rep in started:
        stop_runtime(rep)


class StaticDirectory:
    """A gateway Directory with fixed answers: ``routes`` maps a service name to (its owner's
    token, Route)."""

    def __init__(self, routes: dict | None = None):
        self.routes = routes or {}

    async def route(self, token, name, client=""):
        from inference.gateway import GatewayError
        if token not in {t for t, _ in self.routes.values()} | {"other-user"}:
            raise GatewayError(401, "unauthorized", "the API token is unknown or missing",
                               {"WWW-Authenticate": 'Bearer realm="aiportal"'})
        owner, route = self.routes.get(name, (None, None))
        if route is None or owner != token:
            raise GatewayError(404, "unknown_service", "there is no service named %r that you may call" % name)
        return route


class GatewayThread:
    """An inference gateway serving on 127.0.0.1:PORT from its own thread and event loop."""

    def __init__(self, directory, port: int, **kw):
        import asyncio
        import threading

        from inference.gateway import Gateway
        self.gateway = Gateway(directory, **kw)
        self.port = port
        self.url = "http://127.0.0.1:%d" % port
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.error: BaseException | None = None

        def main():
            asyncio.set_event_loop(self.loop)
            self.stop = asyncio.Event()
            try:
                self.loop.run_until_complete(self.gateway.serve("127.0.0.1:%d" % port, started.set, self.stop,
                                                                grace_s=2))
            except BaseException as e:      # surfaced by the test through .error
                self.error = e
                started.set()
            finally:
                self.loop.close()
        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        started.wait(10)
        if self.error:
            raise self.error

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


@pytest.fixture
def gateways():
    """A factory of gateways on free ports of 9150-9199 (in threads), all stopped at teardown."""
    from tests.conftest import free_port
    started: list[GatewayThread] = []

    def start(directory, **kw) -> GatewayThread:
        gw = GatewayThread(directory, free_port(range(RUNTIME_PORTS[0], RUNTIME_PORTS[1] + 1)), **kw)
        started.append(gw)
        return gw
    yield start
    for gw in started:
        gw.close()
