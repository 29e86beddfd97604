"""The serving runtime: one model replica behind HTTP. Standard library only.

It runs inside the user's image (any image with Python 3), started by a replica's batch job::

    python3 runtime.py --config /aiportal/replica/runtime.json

The config (JSON) names the model and how to serve it:

=================  ==========================================================================
``model_file``     a ``.py`` file defining the class (or ``model_module``: an importable module)
``class_name``     the model class: ``load_model(self)`` and ``execute(self, data, batch_size)``
``model_dir``      the model's folder (weights, the model file); the process ``chdir``s there
``max_batch_size`` at most this many requests per ``execute`` call (default 8)
``max_wait_ms``    how long the first request of a batch waits for others (default 5)
``max_body_bytes`` larger bodies get 413 (default 16 MiB)
``port_range``     ``[first, last]`` ports to try (default 7000-7999; DESIGN.md port plan)
``bind_host``      address to listen on (default 127.0.0.1)
``advertise_host`` the host written into endpoint.json (default: bind_host, or this host's name)
``endpoint_file``  where ``endpoint.json`` is written (atomically: temporary file + rename)
``version``        the service version, echoed in endpoint.json, /healthz and X-Model-Version
``job_id``         the Slurm job id (default: ``$SLURM_JOB_ID``)
``key``            when set, ``/service`` and ``/stats`` answer only requests with the header
                   ``X-Aiportal-Key: KEY`` (the portal's router and probes send it); kept in
                   memory, never logged
=================  ==========================================================================

HTTP:

- ``POST|PUT /service``: the raw request body (as ``curl -T FILE`` sends it) goes to the model as
  one item of a batch; the answer is the model's result for that item: ``bytes`` as
  ``application/octet-stream``, ``str`` as ``text/plain``, anything else as JSON. Concurrent
  requests are batched into one ``execute(data, batch_size)`` call, where ``data`` is a list of
  file-like bodies; the model returns one result per item, in order.
- ``GET /healthz``: 200 once the model is loaded, 503 while it loads or the replica drains
  (open to anyone: it tells readiness only).
- ``GET /stats``: requests in flight, totals, and ``inflight_seconds`` (the time integral of
  requests in flight: its rate is the average concurrency, which the controller scales on).

Errors are JSON ``{"error": code, "message": ...}``: 400 malformed request, 401 no or a wrong
``X-Aiportal-Key`` (with a ``key`` configured), 404, 405, 411 no length, 413 body too large,
500 the model failed on this request (a failed batch is retried item by item, so only the
request that broke it fails), 503 loading or draining. The process survives all of them.
SIGTERM drains: new requests get 503 (the router tries another replica), requests in flight
finish, then the process exits.

One file on purpose: the portal copies this file (``inference.runtime.__file__``) into the
service's folder, and each replica binds that one file read-only at ``/aiportal/runtime.py``
(:func:`inference.service.replica_job`) and runs it with the image's Python. Splitting it needs
the copy and the bind to carry a folder.
"""
from __future__ import annotations

import argparse
import hmac
import importlib
import importlib.util
import io
import json
import logging
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("aiportal.runtime")

DEFAULTS = {
    "model_file": None, "model_module": None, "class_name": "Model", "model_dir": ".",
    "max_batch_size": 8, "max_wait_ms": 5.0, "max_body_bytes": 16 * 1024 * 1024,
    "port_range": [7000, 7999], "bind_host": "127.0.0.1", "advertise_host": None,
    "endpoint_file": None, "version": "", "job_id": None, "drain_timeout_s": 25.0, "key": None,
}
#: the header that carries the service's key from the portal's router and probes
KEY_HEADER = "X-Aiportal-Key"


class ConfigError(Exception):
    """The runtime's config is unusable; the message names the key and the fix."""


def load_config(raw: dict) -> dict:
    """Defaults filled in and every value checked (pure)."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a JSON object")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ConfigError("unknown config keys %s; known: %s" % (sorted(unknown), sorted(DEFAULTS)))
    cfg = dict(DEFAULTS, **raw)
    if bool(cfg["model_file"]) == bool(cfg["model_module"]):
        raise ConfigError("give exactly one of model_file (a .py file) and model_module (an importable module)")
    if not isinstance(cfg["class_name"], str) or not cfg["class_name"].isidentifier():
        raise ConfigError("class_name %r is not a Python class name" % (cfg["class_name"],))
    for key, lo in (("max_batch_size", 1), ("max_body_bytes", 0)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < lo:
            raise ConfigError("%s must be a whole number >= %d, got %r" % (key, lo, cfg[key]))
    if isinstance(cfg["max_wait_ms"], bool) or not isinstance(cfg["max_wait_ms"], (int, float)) \
            or cfg["max_wait_ms"] < 0:
        raise ConfigError("max_wait_ms must be a number >= 0, got %r" % (cfg["max_wait_ms"],))
    pr = cfg["port_range"]
    if (not isinstance(pr, list) or len(pr) != 2 or not all(isinstance(p, int) for p in pr)
            or not 1 <= pr[0] <= pr[1] <= 65535):
        raise ConfigError("port_range must be [first, last] with 1 <= first <= last <= 65535, got %r" % (pr,))
    key = cfg["key"]
    # the message never shows the value: it is a secret
    if key is not None and (not isinstance(key, str) or not 16 <= len(key) <= 256
                            or not all("!" <= c <= "~" for c in key)):
        raise ConfigError("key must be null or 16-256 printable ASCII characters without spaces (it travels in "
                          "the %s header)" % KEY_HEADER)
    return cfg


# -- the model --------------------------------------------------------------------------------

def load_model_class(cfg: dict):
    """Import the model class named by the config (the model dir is on sys.path)."""
    model_dir = os.path.abspath(cfg["model_dir"])
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    if cfg["model_file"]:
        path = cfg["model_file"]
        if not os.path.isabs(path):
            path = os.path.join(model_dir, path)
        if not os.path.isfile(path):
            raise ConfigError("model_file %s does not exist (is it in the model location?)" % path)
        spec = importlib.util.spec_from_file_location("aiportal_user_model", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(cfg["model_module"])
    cls = getattr(module, cfg["class_name"], None)
    if cls is None:
        raise ConfigError("%s defines no class %s" % (cfg["model_file"] or cfg["model_module"], cfg["class_name"]))
    for method in ("load_model", "execute"):
        if not callable(getattr(cls, method, None)):
            raise ConfigError("class %s has no %s() method (the contract: load_model(self), "
                              "execute(self, data, batch_size) -> list)" % (cfg["class_name"], method))
    return cls


def encode_result(result) -> tuple[bytes, str]:
    """A model's result for one request as (body, content type)."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), "application/octet-stream"
    if isinstance(result, str):
        return result.encode("utf-8"), "text/plain; charset=utf-8"
    return (json.dumps(result) + "\n").encode("utf-8"), "application/json"


class Item:
    """One request waiting for its result."""

    __slots__ = ("body", "done", "status", "payload", "ctype")

    def __init__(self, body: bytes):
        self.body = body
        self.done = threading.Event()
        self.status, self.payload, self.ctype = 0, b"", ""

    def finish(self, status: int, payload: bytes, ctype: str) -> None:
        self.status, self.payload, self.ctype = status, payload, ctype
        self.done.set()


def _error_body(code: str, message: str) -> bytes:
    return (json.dumps({"error": code, "message": message}) + "\n").encode("utf-8")


class Batcher:
    """Collects concurrent requests into batches and runs them through the model, one batch at
    a time, on one thread (models need not be thread-safe)."""

    def __init__(self, model, max_batch_size: int, max_wait_ms: float):
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: "queue.Queue[Item | None]" = queue.Queue()
        self.batches = 0
        self.items = 0
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, item: Item) -> None:
        self.queue.put(item)

    def stop(self) -> None:
        self.queue.put(None)

    def _collect(self, first: Item) -> list[Item]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is None:
                self.queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = self._collect(first)
            self.batches += 1
            self.items += len(batch)
            self.run_batch(batch)

    def _execute(self, batch: list[Item]) -> list:
        results = self.model.execute([io.BytesIO(it.body) for it in batch], len(batch))
        if not isinstance(results, (list, tuple)) or len(results) != len(batch):
            n = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
            raise ValueError("execute() returned %s results for a batch of %d; it must return a list with one "
                             "result per item, in order" % (n, len(batch)))
        return list(results)

    def run_batch(self, batch: list[Item]) -> None:
        try:
            results = self._execute(batch)
        except Exception as e:  # noqa: BLE001 -- the model's error goes back to the requests, not up
            if len(batch) == 1:
                log.warning("model error: %s", e)
                batch[0].finish(500, _error_body("model_error", "the model failed on this request: %s: %s"
                                                 % (type(e).__name__, e)), "application/json")
                return
            # find the request(s) that broke the batch: every other one still gets its answer
            for it in batch:
                self.run_batch([it])
            return
        for it, result in zip(batch, results):
            try:
                body, ctype = encode_result(result)
            except (TypeError, ValueError) as e:
                it.finish(500, _error_body("model_error", "the model's result cannot be sent: %s" % e),
                          "application/json")
                continue
            it.finish(200, body, ctype)


class Stats:
    """Counters for /stats; ``inflight_seconds`` integrates requests in flight over time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.integral = 0.0
        self.last = time.monotonic()
        self.started = self.last

    def _advance(self) -> None:
        now = time.monotonic()
        self.integral += self.in_flight * (now - self.last)
        self.last = now

    def enter(self) -> None:
        with self.lock:
            self._advance()
            self.in_flight += 1
            self.requests += 1

    def leave(self, ok: bool) -> None:
        with self.lock:
            self._advance()
            self.in_flight -= 1
            if not ok:
                self.errors += 1

    def snapshot(self) -> dict:
        with self.lock:
            self._advance()
            return {"in_flight": self.in_flight, "requests_total": self.requests, "errors_total": self.errors,
                    "inflight_seconds": round(self.integral, 6), "uptime_s": round(self.last - self.started, 3)}


# -- HTTP -------------------------------------------------------------------------------------

class Runtime:
    """The process: config, model, batcher, HTTP server and endpoint file."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.state = "loading"          # loading -> ready -> draining; or failed
        self.message = ""
        self.stats = Stats()
        self.batcher: Batcher | None = None
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self._key = cfg["key"].encode("ascii") if cfg.get("key") else None

    def authorized(self, given: str | None) -> bool:
        """Whether a request with ``X-Aiportal-Key: given`` may use /service and /stats
        (always, when no key is configured). Compared in constant time."""
        if self._key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode("latin-1", "replace"), self._key)

    def bind(self) -> ThreadingHTTPServer:
        """Listen on the first free port of the range, starting at a random one (replicas on
        one node then rarely collide; a taken port is simply skipped: bind() is atomic)."""
        first, last = self.cfg["port_range"]
        ports = list(range(first, last + 1))
        start = random.randrange(len(ports))
        handler = type("Handler", (Handler,), {"runtime": self})
        for port in ports[start:] + ports[:start]:
            try:
                server = Server((self.cfg["bind_host"], port), handler)
            except OSError:
                continue
            server.daemon_threads = True
            self.server, self.port = server, port
            return server
        raise OSError("no free port in %d-%d on %s" % (first, last, self.cfg["bind_host"]))

    def endpoint(self) -> dict:
        host = self.cfg["advertise_host"] or self.cfg["bind_host"]
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return {"host": host, "port": self.port, "version": self.cfg["version"],
                "job_id": self.cfg["job_id"] or os.environ.get("SLURM_JOB_ID", ""), "pid": os.getpid(),
                "started_at": time.time()}

    def write_endpoint(self) -> None:
        path = self.cfg["endpoint_file"]
        if not path:
            return
        tmp = "%s.%d.tmp" % (path, os.getpid())
        with open(tmp, "w") as f:
            json.dump(self.endpoint(), f)
            f.write("\n")
        os.replace(tmp, path)
        log.info("endpoint %s:%d written to %s", self.endpoint()["host"], self.port, path)

    def remove_endpoint(self) -> None:
        path = self.cfg["endpoint_file"]
        if not path:
            return
        try:
            with open(path) as f:
                mine = json.load(f).get("pid") == os.getpid()
            if mine:
                os.unlink(path)
        except (OSError, ValueError):
            pass

    def load(self) -> None:
        try:
            cls = load_model_class(self.cfg)
            model = cls()
            model.load_model()
        except Exception as e:  # noqa: BLE001 -- reported on /healthz and in the log, then the process exits
            self.state, self.message = "failed", "loading the model failed: %s: %s" % (type(e).__name__, e)
            log.error("%s\n%s", self.message, traceback.format_exc())
            return
        self.batcher = Batcher(model, self.cfg["max_batch_size"], self.cfg["max_wait_ms"])
        self.batcher.start()
        self.state = "ready"
        log.info("model %s loaded; ready (max batch %d, max wait %.1f ms)", self.cfg["class_name"],
                 self.cfg["max_batch_size"], self.cfg["max_wait_ms"])

    def drain(self, timeout: float) -> None:
        """Refuse new requests (503), wait for those in flight, stop."""
        self.state = "draining"
        log.info("draining: %d requests in flight", self.stats.in_flight)
        deadline = time.monotonic() + timeout
        while self.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        # a moment for the router to see 503s and for answers to leave the socket buffers
        time.sleep(0.1)
        if self.batcher:
            self.batcher.stop()
        self.remove_endpoint()
        if self.server:
            self.server.shutdown()


class Server(ThreadingHTTPServer):
    # the default listen backlog (5) resets connections when many clients connect at once
    request_queue_size = 256


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive: the router reuses connections
    # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold every answer back ~40 ms
    disable_nagle_algorithm = True
    server_version = "aiportal-runtime/1"
    runtime: Runtime

    def log_message(self, fmt, *args):  # access logs only at DEBUG (the job log stays readable)
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        version = self.runtime.cfg["version"]
        if version:
            self.send_header("X-Model-Version", str(version))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, close: bool = False) -> None:
        self._send(status, _error_body(code, message), close=close)

    def _refuse_unauthorized(self) -> bool:
        """Answer 401 (and True) when the runtime has a key and the request lacks it. A body of
        an allowed size is read and dropped first, so the connection stays usable (closing it
        on unread data resets it, and the client might lose the answer)."""
        if self.runtime.authorized(self.headers.get(KEY_HEADER)):
            return False
        length = self.headers.get("Content-Length", "0").strip()
        te = self.headers.get("Transfer-Encoding", "identity").lower()
        drained = te == "identity" and length.isdigit() and int(length) <= self.runtime.cfg["max_body_bytes"]
        if drained and int(length):
            drained = len(self.rfile.read(int(length))) == int(length)
        self._error(401, "unauthorized", "this replica takes requests from the portal's router only; call the "
                    "service through the portal: POST /service/NAME with an API token", close=not drained)
        return True

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        rt = self.runtime
        if path == "/healthz":
            body = json.dumps({"status": rt.state, "version": rt.cfg["version"], "message": rt.message}).encode()
            self._send(200 if rt.state == "ready" else 503, body + b"\n")
        elif path == "/stats":
            if self._refuse_unauthorized():
                return
            snap = rt.stats.snapshot()
            if rt.batcher:
                snap.update(batches_total=rt.batcher.batches, items_total=rt.batcher.items)
            snap.update(state=rt.state, version=rt.cfg["version"], max_batch_size=rt.cfg["max_batch_size"])
            self._send(200, (json.dumps(snap) + "\n").encode())
        elif path == "/service":
            self._error(405, "method_not_allowed", "send the input with POST or PUT (curl -T FILE URL)")
        else:
            self._error(404, "not_found", "this replica serves POST|PUT /service, GET /healthz and GET /stats")

    do_HEAD = do_GET

    def _read_body(self) -> bytes | None:
        """The request body (Content-Length or chunked), or None after answering an error."""
        limit = self.runtime.cfg["max_body_bytes"]
        te = self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        if te and te != "identity":
            if te != "chunked":
                self._error(400, "bad_request", "unsupported Transfer-Encoding %r" % te, close=True)
                return None
            return self._read_chunked(limit)
        if length is None:
            self._error(411, "length_required", "send a Content-Length (curl -T FILE does)", close=True)
            return None
        if not length.strip().isdigit():
            self._error(400, "bad_request", "Content-Length %r is not a number" % length, close=True)
            return None
        n = int(length)
        if n > limit:
            self._error(413, "too_large", "the body is %d bytes; this service takes at most %d" % (n, limit),
                        close=True)
            return None
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            return None
        return body

    def _read_chunked(self, limit: int) -> bytes | None:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._error(400, "bad_request", "malformed chunked body", close=True)
                return None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self._error(413, "too_large", "the body is over %d bytes, the most this service takes" % limit,
                            close=True)
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(3)

    def _serve(self):
        path = self.path.split("?", 1)[0]
        if path != "/service":
            self._error(404, "not_found", "send model inputs to /service")
            return
        if self._refuse_unauthorized():
            return
        rt = self.runtime
        rt.stats.enter()        # before the state check: a drain waits for every request it let in
        ok = False
        try:
            if rt.state != "ready":
                body = self._read_body()       # keep the connection usable
                if body is not None:
                    self._error(503, rt.state, "the replica is %s; try another replica or again later" % rt.state)
                return
            body = self._read_body()
            if body is None:
                return
            item = Item(body)
            rt.batcher.submit(item)
            item.done.wait()
            ok = item.status == 200
            self._send(item.status, item.payload, item.ctype)
        finally:
            rt.stats.leave(ok)

    do_POST = _serve
    do_PUT = _serve

    def _not_allowed(self):
        self._error(405, "method_not_allowed", "use POST or PUT on /service, GET on /healthz and /stats")

    do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="aiportal serving runtime (one model replica)")
    ap.add_argument("--config", required=True, help="the replica's JSON config")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[runtime %(asctime)s] %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        with open(args.config) as f:
            cfg = load_config(json.load(f))
    except (OSError, ValueError, ConfigError) as e:
        log.error("cannot use config %s: %s", args.config, e)
        return 2
    if cfg["model_dir"]:
        try:
            os.chdir(cfg["model_dir"])
        except OSError as e:
            log.error("model_dir %s: %s", cfg["model_dir"], e)
            return 2
    rt = Runtime(cfg)
    try:
        server = rt.bind()
    except OSError as e:
        log.error("%s", e)
        return 3
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    serving.start()
    stop = threading.Event()

    def on_term(signum, _frame):
        log.info("got signal %d: draining", signum)
        stop.set()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        rt.write_endpoint()
    except OSError as e:
        log.error("cannot write endpoint file %s: %s", cfg["endpoint_file"], e)
        return 3
    log.info("listening on %s:%d (version %s)", cfg["bind_host"], rt.port, cfg["version"] or "-")
    rt.load()
    if rt.state == "failed":
        rt.remove_endpoint()
        server.shutdown()
        return 4
    while not stop.wait(0.5):
        pass
    rt.drain(cfg["drain_timeout_s"])
    serving.join(5)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
