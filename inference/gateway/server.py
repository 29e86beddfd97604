"""The gateway process: :class:`Gateway` serves client connections (``POST|PUT /service/NAME``),
asks its :class:`~inference.gateway.routes.Directory` where a request may go, picks a replica
with :class:`~inference.balancer.Balancer`, forwards the request over the pool of kept-alive
connections (:mod:`inference.gateway.upstream`) and relays the answer; :func:`run` is the
process entry (SIGTERM/SIGINT, uvloop when installed). The request path is described in
:mod:`inference.gateway`."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket

from inference.balancer import Balancer, Target
from inference.gateway.http1 import (CHUNK, MAX_HEAD, BodyTooLarge, GatewayError, Request, answer_head, discard,
                                     discard_chunked, error_answer, parse_head, read_chunked)
from inference.gateway.routes import Directory, Route
from inference.gateway.upstream import Dropped, Upstream, UpstreamPool
from inference.runtime import KEY_HEADER
from inference.service import MAX_BODY_BYTES

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"/service/([A-Za-z0-9][A-Za-z0-9_.-]{0,62})")
#: request headers passed on to the replica (the rest, e.g. Authorization, stay here)
FORWARD_HEADERS = ("content-type", "accept", "x-request-id")
#: answer headers passed back to the client
RETURN_HEADERS = ("content-type", "x-model-version")


def client_of(request: Request, writer: asyncio.StreamWriter) -> str:
    """The caller's address: on a unix socket (behind the site's nginx, which sets it) the
    X-Forwarded-For nginx sent (its last address: nginx's own ``$remote_addr``); on TCP the peer's."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    forwarded = request.headers.get("x-forwarded-for", "")
    return forwarded.rsplit(",", 1)[-1].strip()[:100] or "unix-socket"


class Gateway:
    """One gateway: ``timeout`` for a replica's answer (then 504), ``connect_timeout`` for a
    connection to a replica, ``eject_s`` a failed replica sits out, ``max_attempts`` replicas
    tried per request, ``idle_s`` a client connection (or its body) may stay silent,
    ``max_idle_upstream`` idle connections kept per replica, ``drain_max`` the most bytes of a
    refused request's body read and thrown away after answering (:meth:`_drain`)."""

    def __init__(self, directory: Directory, *, timeout: float = 300.0, connect_timeout: float = 2.0,
                 eject_s: float = 5.0, max_attempts: int = 3, idle_s: float = 75.0, max_idle_upstream: int = 64,
                 drain_max: int = MAX_BODY_BYTES):
        self.directory = directory
        self.timeout, self.max_attempts, self.idle_s = timeout, max_attempts, idle_s
        self.drain_max = drain_max
        self.balancer = Balancer(eject_s)
        self.upstreams = UpstreamPool(timeout=timeout, connect_timeout=connect_timeout, max_idle=max_idle_upstream)
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
            route, length = await self._check(request, client_of(request, writer))
        except GatewayError as e:
            # refused before its body was read: answered, then the body is read and thrown away
            # (see _drain); the connection carries on when all of it was
            keep = keep and e.status not in (400, 411) and self._drainable(request)
            writer.write(error_answer(e, close=not keep))
            await writer.drain()
            return await self._drain(request, reader) and keep
        try:
            body = await self._read_body(request, route, length, reader, writer)
        except GatewayError as e:
            # 408, a malformed chunked body, or a chunked one over the limit (the rest of it
            # thrown away before closing, as above): this connection ends here
            writer.write(error_answer(e, close=True))
            await writer.drain()
            if isinstance(e, BodyTooLarge):
                await self._drain(request, reader, e.pending)
            return False
        try:
            await self._forward(route, request, body, writer, keep)
        except GatewayError as e:
            writer.write(error_answer(e, close=not keep))
            await writer.drain()
        self.served += 1
        return keep

    def _drainable(self, request: Request) -> bool:
        """Whether :meth:`_drain` can read all of this request's body."""
        if not request.has_body:
            return True
        if request.headers.get("expect", "").lower() == "100-continue":
            return False
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            return True     # up to drain_max: known only once read
        length = request.headers.get("content-length", "")
        return length.isdigit() and int(length) <= self.drain_max

    async def _drain(self, request: Request, reader: asyncio.StreamReader, pending: int | None = None) -> bool:
        """Read the body of a refused request and throw it away, at most ``drain_max`` bytes
        (never more than CHUNK in memory), within ``idle_s``; True when all of it was read.
        ``pending``: a chunked body read up to the data of a chunk of this size.

        Why: the web server in front (nginx) reads the client's whole body, then writes all of it
        here and reads the answer after. Closing with the body unread makes its write fail
        (EPIPE on the unix socket, a reset on TCP) and it then answers the client its own HTML
        502 rather than ours; on TCP the reset can also destroy our answer before a client
        reads it. Answering first, then reading, serves both nginx and clients that stop sending
        once answered (they have their answer; the connection ends when the body does, or after
        ``idle_s``). nginx takes no body for /service/ larger than the largest service limit
        (``client_max_body_size`` in nginx.conf.j2 = MAX_BODY_BYTES = the default
        ``drain_max``), so all it sends is read. A client that asked ``Expect: 100-continue``
        sends no body until told to: its connection is closed after the answer."""
        if pending is None and not self._drainable(request):
            return False
        if not request.has_body:
            return True
        try:
            async with asyncio.timeout(self.idle_s):
                if pending is not None or request.headers.get("transfer-encoding", "").lower() == "chunked":
                    return await discard_chunked(reader, self.drain_max, pending)
                await discard(reader, int(request.headers["content-length"]))
                return True
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return False

    async def _check(self, request: Request, client: str = "") -> tuple[Route, int | None]:
        """Check a request's head: its route and body length (None: chunked); GatewayError for
        every refusal."""
        m = NAME_RE.fullmatch(request.path)
        if m is None:
            raise GatewayError(404, "not_found", "this address serves POST|PUT /service/NAME only (the API is under "
                                                 "/api/v1)")
        if request.method not in ("POST", "PUT"):
            raise GatewayError(405, "method_not_allowed", "send the input with POST or PUT "
                               "(curl -X POST URL -T FILE)", {"Allow": "POST, PUT"})
        name = m.group(1)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            # no token: "" (a public service takes it; the directory answers 401 for the rest)
            route = await self.directory.route(token, name, client)
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
        return route, n

    async def _read_body(self, request: Request, route: Route, n: int | None, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bytes:
        """The body of a request that passed :meth:`_check` (``n`` bytes; None: chunked)."""
        if request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.idle_s):
                if n is not None:
                    return await reader.readexactly(n)
                return await read_chunked(reader, route.service, route.max_body)
        except TimeoutError as e:
            raise GatewayError(408, "bad_request", "the request body did not arrive within %.0fs" % self.idle_s) from e

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
                up, status, headers = await self.upstreams.send(target, out)
            except TimeoutError as e:
                self.balancer.done(target)
                raise GatewayError(504, "replica_timeout", "service %s: replica %s:%d did not answer within %.0fs"
                                   % (route.service, target.host, target.port, self.timeout)) from e
            except (OSError, Dropped, asyncio.IncompleteReadError, ValueError) as e:
                self.balancer.done(target)
                self.balancer.eject(target)
                errors.append("%s:%d: %s" % (target.host, target.port, str(e) or type(e).__name__))
                log.info("service %s: replica %s:%d failed (%s); trying another", route.service, target.host,
                         target.port, e)
                continue
            if status == 503 and attempt < self.max_attempts and len(tried) < len(route.targets):
                # loading or draining: nothing reached the model; another replica takes it
                try:
                    await self.upstreams.skip_body(up, headers)
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

    async def _relay(self, target: Target, up: Upstream, status: int, headers: dict[str, str],
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
                        self.upstreams.release(up, headers)
                out["Content-Length"] = str(len(data) + rest)
                if not rest:
                    self.balancer.done(target)      # answered: no longer in flight there
                    target = None
                started = True
                writer.write(answer_head(status, out, close=not keep) + data)
                while rest:
                    data = await up.reader.readexactly(min(rest, CHUNK))
                    rest -= len(data)
                    writer.write(data)
                    await writer.drain()
            if target is not None:
                self.upstreams.release(up, headers)
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
        self.upstreams.close()
        close = getattr(self.directory, "close", None)
        if close is not None:
            await close()
        await asyncio.sleep(0.05)       # let the closed transports finish closing
        log.info("inference gateway stopped after %d requests", self.served)


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
