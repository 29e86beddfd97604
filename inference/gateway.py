"""The inference gateway: an asyncio HTTP/1.1 server for ``POST|PUT /service/NAME``.

It is the front door of every service (in a deployment the portal's web server passes
``/service/`` to it; see docs/inference.md). Per request:

1. ``Authorization: Bearer TOKEN`` and the service name go to a :class:`Directory` (the portal
   implements it on its database, cached), which answers the service's ready replicas and body
   limit, or an error (401 unknown token, 404 unknown or another user's service);
2. the body is read (``Content-Length`` or chunked; ``Expect: 100-continue`` is answered once
   the checks passed; over the service's limit: 413 before reading it);
3. :class:`~inference.router.Balancer` picks a replica; the request goes to it over a
   kept-alive connection, with the service's key (``X-Aiportal-Key``: replicas answer only
   requests that carry it), and the answer is streamed back (status, Content-Type,
   ``X-Model-Version``, plus ``X-Replica``);
4. a replica that refused or dropped the connection before answering, or answered 503 (loading
   or draining: nothing reached the model), is ejected for a while and the next one is tried;
   a replica that took the request and did not answer within ``timeout`` gets 504 and the
   request is not sent again (a model never sees a request twice after it may have run it).

One event loop, no threads on the request path (the directory's database reads run in a
thread pool, off the hot path). Uses uvloop when it is installed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from typing import Protocol

from inference.router import Balancer, Target
from inference.runtime import KEY_HEADER

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"/service/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})")
#: request headers passed on to the replica (the rest, e.g. Authorization, stay here)
FORWARD_HEADERS = ("content-type", "accept", "x-request-id")
#: answer headers passed back to the client
RETURN_HEADERS = ("content-type", "x-model-version")
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024


class GatewayError(Exception):
    """An answer the gateway gives itself: status, a code and a message naming the fix."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


@dataclass(frozen=True)
class Route:
    """Where a caller's request for a service may go."""
    service: str
    targets: tuple[Target, ...]
    max_body: int = 0           #: bytes; 0: no limit of the service's own
    #: the service's key, sent to its replicas in X-Aiportal-Key; "": a service without one
    key: str = field(default="", repr=False)


class Directory(Protocol):
    async def route(self, token: str, name: str) -> Route:
        """The service ``name`` as the caller of ``token`` may use it; raises GatewayError
        (401 for a bad token, 404 for a service that is unknown or not theirs)."""


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn

    @property
    def has_body(self) -> bool:
        return (self.headers.get("transfer-encoding", "").lower() == "chunked"
                or self.headers.get("content-length", "0").strip() not in ("", "0"))


def parse_head(head: bytes) -> Request:
    """The request line and headers (names lower-cased) of one HTTP/1.x request head."""
    lines = head.decode("latin-1").split("\r\n")        # latin-1 decodes every byte
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        if len(parts) == 3 and parts[2].startswith("HTTP/"):
            raise GatewayError(505, "bad_request", "only HTTP/1.0 and HTTP/1.1 are served here")
        raise GatewayError(400, "bad_request", "malformed request line %r" % lines[0][:100])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise GatewayError(400, "bad_request", "malformed header line %r" % line[:100])
        name = name.lower()
        if name in headers and name in ("content-length", "transfer-encoding", "authorization"):
            raise GatewayError(400, "bad_request", "header %s given twice" % name)
        headers[name] = value.strip()
    return Request(parts[0], parts[1].partition("?")[0], parts[2], headers)


def _head(status: int, headers: dict[str, str], close: bool) -> bytes:
    lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status"))]
    lines += ["%s: %s" % kv for kv in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_answer(e: GatewayError, close: bool) -> bytes:
    body = json.dumps({"error": e.code, "message": e.message}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **e.headers}
    return _head(e.status, headers, close) + body


class _Upstream:
    """One kept-alive connection to a replica."""
    __slots__ = ("key", "reader", "writer")

    def __init__(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.key, self.reader, self.writer = key, reader, writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class _Dropped(Exception):
    """The replica closed or reset the connection before its answer began."""


class Gateway:
    def __init__(self, directory: Directory, *, timeout: float = 300.0, connect_timeout: float = 2.0,
                 eject_s: float = 5.0, max_attempts: int = 3, idle_s: float = 75.0, max_idle_upstream: int = 64):
        self.directory = directory
        self.timeout, self.connect_timeout, self.max_attempts = timeout, connect_timeout, max_attempts
        self.idle_s, self.max_idle_upstream = idle_s, max_idle_upstream
        self.balancer = Balancer(eject_s)
        self._pool: dict[tuple[str, int], list[_Upstream]] = {}
        self._connections: set[asyncio.Task] = set()
        self.served = 0

    # -- the client side --------------------------------------------------------------------

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection: requests one after another (keep-alive)."""
        task = asyncio.current_task()
        self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_s):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(error_answer(GatewayError(431, "bad_request", "request head over %d bytes"
                                                           % MAX_HEAD), close=True))
                    return
                try:
                    request = parse_head(head)
                except GatewayError as e:
                    writer.write(error_answer(e, close=True))
                    return
                if not await self.exchange(request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(task)
            try:
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()

    async def exchange(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True when the connection may carry another."""
        keep = request.keep_alive
        try:
            route, body = await self._accept(request, reader, writer)
        except GatewayError as e:
            # an unread body ends the connection; an empty one leaves it usable
            keep = keep and not request.has_body
            if e.status in (411, 413, 400):
                keep = False
            writer.write(error_answer(e, close=not keep))
            await writer.drain()
            return keep
        try:
            await self._forward(route, request, body, writer, keep)
        except GatewayError as e:
            writer.write(error_answer(e, close=not keep))
            await writer.drain()
        self.served += 1
        return keep

    async def _accept(self, request: Request, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> tuple[Route, bytes]:
        """Check the request and read its body; GatewayError for every refusal."""
        m = NAME_RE.fullmatch(request.path)
        if m is None:
            raise GatewayError(404, "not_found", "this address serves POST|PUT /service/NAME only (the API is under "
                                                 "/api/v1)")
        if request.method not in ("POST", "PUT"):
            raise GatewayError(405, "method_not_allowed", "send the input with POST or PUT "
                               "(curl -X POST URL -T FILE)", {"Allow": "POST, PUT"})
        name = m.group(1)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(401, "unauthorized", "send 'Authorization: Bearer TOKEN' with an API token of the "
                               "service's owner (`aiportal token create`, or the Tokens page)",
                               {"WWW-Authenticate": 'Bearer realm="aiportal"'})
        try:
            route = await self.directory.route(token.strip(), name)
        except GatewayError:
            raise
        except Exception as e:
            # e.g. the portal's database is down: an answer, not a dropped connection
            log.exception("service %s: the directory failed", name)
            raise GatewayError(503, "unavailable", "the portal cannot look up services right now (%s); try again "
                               "shortly" % type(e).__name__, {"Retry-After": "5"}) from e
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        length = request.headers.get("content-length")
        if length is None and not chunked:
            raise GatewayError(411, "length_required", "send the input as the request body with a Content-Length "
                                                       "(curl -X POST URL -T FILE)")
        if request.headers.get("transfer-encoding") and not chunked:
            raise GatewayError(400, "bad_request", "Transfer-Encoding %r is not served; send a Content-Length"
                               % request.headers["transfer-encoding"])
        n = None
        if length is not None and not chunked:
            if not length.isdigit():
                raise GatewayError(400, "bad_request", "Content-Length %r is not a number" % length)
            n = int(length)
            if route.max_body and n > route.max_body:
                raise GatewayError(413, "too_large", "the body is %d bytes; service %s takes at most %d"
                                   % (n, name, route.max_body))
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.idle_s):
                body = await reader.readexactly(n) if n is not None else await _read_chunked(reader, route)
        except TimeoutError as e:
            raise GatewayError(408, "bad_request", "the request body did not arrive within %.0fs" % self.idle_s) from e
        return route, body

    # -- the replica side ---------------------------------------------------------------------

    async def _forward(self, route: Route, request: Request, body: bytes, writer: asyncio.StreamWriter,
                       keep: bool) -> None:
        if not route.targets:
            raise GatewayError(503, "no_ready_replica", "service %s has no ready replica right now; it may be "
                               "starting, scaling or recovering: try again shortly (`aiportal service show %s`)"
                               % (route.service, route.service), {"Retry-After": "1"})
        hdrs = ["%s %s HTTP/1.1" % (request.method, "/service"), "Host: replica", "Content-Length: %d" % len(body)]
        hdrs += ["%s: %s" % (h, request.headers[h]) for h in FORWARD_HEADERS if request.headers.get(h)]
        if route.key:
            hdrs.append("%s: %s" % (KEY_HEADER, route.key))
        out = ("\r\n".join(hdrs) + "\r\n\r\n").encode("latin-1") + body
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            target = self.balancer.pick(route.targets, tried)
            if target is None:
                break
            tried.add(target.key)
            try:
                up, status, headers = await self._send(target, out)
            except TimeoutError as e:
                self.balancer.done(target)
                raise GatewayError(504, "replica_timeout", "service %s: replica %s:%d did not answer within %.0fs"
                                   % (route.service, target.host, target.port, self.timeout)) from e
            except (OSError, _Dropped, asyncio.IncompleteReadError, ValueError) as e:
                self.balancer.done(target)
                self.balancer.eject(target)
                errors.append("%s:%d: %s" % (target.host, target.port, str(e) or type(e).__name__))
                log.info("service %s: replica %s:%d failed (%s); trying another", route.service, target.host,
                         target.port, e)
                continue
            if status == 503 and attempt < self.max_attempts and len(tried) < len(route.targets):
                # loading or draining: nothing reached the model; another replica takes it
                try:
                    await self._skip_body(up, headers)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    up.close()
                self.balancer.done(target)
                self.balancer.eject(target)
                errors.append("%s:%d: answered 503" % (target.host, target.port))
                continue
            await self._relay(target, up, status, headers, writer, keep)
            return
        if not errors:
            raise GatewayError(503, "no_ready_replica", "service %s has no ready replica right now; try again "
                               "shortly" % route.service, {"Retry-After": "1"})
        raise GatewayError(502, "replicas_unreachable", "service %s: no replica answered (%s); the portal is "
                           "replacing failed replicas: try again shortly" % (route.service, "; ".join(errors)),
                           {"Retry-After": "1"})

    async def _connect(self, target: Target) -> tuple[_Upstream, bool]:
        idle = self._pool.get((target.host, target.port))
        while idle:
            up = idle.pop()
            if up.usable():
                return up, True
            up.close()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port, limit=MAX_HEAD)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Upstream((target.host, target.port), reader, writer), False

    async def _send(self, target: Target, out: bytes) -> tuple[_Upstream, int, dict[str, str]]:
        """Send one request; (connection, status, headers) once the answer's head arrived. An
        idle connection the replica closed meanwhile is retried once on a fresh one."""
        for _ in range(2):
            up, reused = await self._connect(target)
            try:
                up.writer.write(out)
                async with asyncio.timeout(self.timeout):
                    try:
                        head = await up.reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as e:
                        if e.partial:
                            raise
                        raise _Dropped("connection closed before the answer") from e
                    except ConnectionError as e:
                        raise _Dropped(str(e) or type(e).__name__) from e
            except _Dropped:
                up.close()
                if reused:
                    continue
                raise
            except BaseException:
                up.close()
                raise
            lines = head.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            status = int(rest[:3])
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            return up, status, headers
        raise _Dropped("connection dropped twice")

    async def _skip_body(self, up: _Upstream, headers: dict[str, str]) -> None:
        n = int(headers.get("content-length", "0") or 0)
        async with asyncio.timeout(self.connect_timeout):
            await up.reader.readexactly(n)
        self._release(up, headers)

    async def _relay(self, target: Target, up: _Upstream, status: int, headers: dict[str, str],
                     writer: asyncio.StreamWriter, keep: bool) -> None:
        """Stream the replica's answer to the client. The request stops counting as in flight
        to ``target`` once the replica's answer was read (or failed)."""
        out = {h.title(): headers[h] for h in RETURN_HEADERS if h in headers}
        out["X-Replica"] = target.key[:8]
        length = headers.get("content-length")
        started = False
        try:
            if headers.get("transfer-encoding") or (length is not None and not length.isdigit()):
                raise GatewayError(502, "bad_replica_answer", "the replica answered without a valid "
                                   "Content-Length; is it the aiportal serving runtime?")
            async with asyncio.timeout(self.timeout):
                if length is None:              # delimited by the end of the connection
                    data, rest = await up.reader.read(-1), 0
                    up.close()
                else:
                    n = int(length)
                    data = await up.reader.readexactly(min(n, CHUNK))
                    rest = n - len(data)
                    if not rest:
                        self._release(up, headers)
                out["Content-Length"] = str(len(data) + rest)
                if not rest:
                    self.balancer.done(target)      # answered: no longer in flight there
                    target = None
                started = True
                writer.write(_head(status, out, close=not keep) + data)
                while rest:
                    data = await up.reader.readexactly(min(rest, CHUNK))
                    rest -= len(data)
                    writer.write(data)
                    await writer.drain()
            if target is not None:
                self._release(up, headers)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            up.close()
            if started:
                writer.close()      # the answer was cut: the client's connection cannot carry on
                raise ConnectionError("answer cut") from e
            raise GatewayError(502, "replica_dropped", "the replica dropped the connection while answering: %s"
                               % (str(e) or type(e).__name__)) from e
        except BaseException:
            up.close()
            raise
        finally:
            if target is not None:
                self.balancer.done(target)

    def _release(self, up: _Upstream, headers: dict[str, str]) -> None:
        if "close" in headers.get("connection", "").lower() or not up.usable():
            up.close()
            return
        idle = self._pool.setdefault(up.key, [])
        if len(idle) < self.max_idle_upstream:
            idle.append(up)
        else:
            up.close()

    # -- running ------------------------------------------------------------------------------

    async def serve(self, listen: str, ready=None, stop: asyncio.Event | None = None, grace_s: float = 10.0) -> None:
        """Listen on ``HOST:PORT`` or ``unix:PATH`` until ``stop`` is set (or SIGTERM/SIGINT
        when none is given); requests in flight get ``grace_s`` to finish."""
        stop = stop or _signal_event()
        if listen.startswith("unix:"):
            path = listen[len("unix:"):]
            if os.path.exists(path):
                os.unlink(path)
            server = await asyncio.start_unix_server(self.connection, path, limit=MAX_HEAD, backlog=512)
            os.chmod(path, 0o666)       # the web server in front connects as its own user
        else:
            host, _, port = listen.rpartition(":")
            server = await asyncio.start_server(self.connection, host or "127.0.0.1", int(port), limit=MAX_HEAD,
                                                backlog=512, reuse_address=True)
        log.info("inference gateway listening on %s", listen)
        if ready is not None:
            ready()
        async with server:
            await stop.wait()
            server.close()
            if self._connections:
                await asyncio.wait(list(self._connections), timeout=grace_s)
            for task in list(self._connections):
                task.cancel()
        for idle in self._pool.values():
            for up in idle:
                up.close()
        self._pool.clear()
        close = getattr(self.directory, "close", None)
        if close is not None:
            await close()
        await asyncio.sleep(0.05)       # let the closed transports finish closing
        log.info("inference gateway stopped after %d requests", self.served)


async def _read_chunked(reader: asyncio.StreamReader, route: Route) -> bytes:
    parts, total = [], 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as e:
            raise GatewayError(400, "bad_request", "malformed chunked body") from e
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":      # trailers
                pass
            return b"".join(parts)
        total += size
        if route.max_body and total > route.max_body:
            raise GatewayError(413, "too_large", "the body is over %d bytes, the most service %s takes"
                               % (route.max_body, route.service))
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise GatewayError(400, "bad_request", "malformed chunked body")


def _signal_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run(gateway: Gateway, listen: str, ready=None) -> None:
    """Run the gateway until SIGTERM/SIGINT, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(gateway.serve(listen, ready))
    else:
        uvloop.run(gateway.serve(listen, ready))
