"""The router's core: pick a ready replica, forward a request, stream the answer back.

Framework-free (the portal's ``/service/NAME`` view wraps it). Per process:

- **least outstanding requests**: each request goes to the ready replica with the fewest
  requests this process has in flight to it; ties are broken round-robin, so sequential
  requests spread too;
- **keep-alive connections**, one pool per thread and replica (no TCP handshake per request);
- **retries**: a request whose replica refused the connection, dropped it before answering, or
  answered 503 (loading or draining: the runtime sends nothing to the model then) goes to the
  next replica; such a replica is left out of this process's picks for ``eject_s`` seconds.
  Model inputs are sent again only when no answer was received, so a model never sees a
  request twice after it answered; inference is free of side effects, so this is safe for
  POST as for PUT;
- no ready replica: :class:`~inference.errors.NoReadyReplica` (the portal answers 503).
"""
from __future__ import annotations

import http.client
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from inference.errors import NoReadyReplica, ReplicaUnreachable

log = logging.getLogger(__name__)

#: request headers passed on to the replica (the rest, e.g. Authorization, stay in the portal)
FORWARD_HEADERS = ("Content-Type", "Accept", "X-Request-Id")
#: answer headers passed back to the client
RETURN_HEADERS = ("Content-Type", "X-Model-Version")


@dataclass(frozen=True)
class Target:
    key: str        #: the replica id
    host: str
    port: int
    version: str = ""


class Upstream:
    """A replica's answer being streamed back; :meth:`close` must be called (the body iterator
    does it when exhausted)."""

    def __init__(self, router: "Router", target: Target, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, attempts: int):
        self.router, self.target, self.conn, self.resp, self.attempts = router, target, conn, resp, attempts
        self.status = resp.status
        self.headers = {h: resp.getheader(h) for h in RETURN_HEADERS if resp.getheader(h) is not None}
        self._closed = False

    def body(self, chunk: int = 65536) -> Iterator[bytes]:
        try:
            while True:
                data = self.resp.read(chunk)
                if not data:
                    break
                yield data
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        reusable = self.resp.isclosed() and not self.resp.will_close
        self.router._release(self.target, self.conn if reusable else None)


class Router:
    def __init__(self, timeout: float = 300.0, connect_timeout: float = 2.0, eject_s: float = 5.0,
                 max_attempts: int = 3):
        self.timeout, self.connect_timeout, self.eject_s, self.max_attempts = timeout, connect_timeout, eject_s, max_attempts
        self._lock = threading.Lock()
        self._outstanding: dict[str, int] = {}
        self._ejected: dict[str, float] = {}
        self._rr = itertools.count()
        self._local = threading.local()

    # -- choosing ---------------------------------------------------------------------------

    def outstanding(self, key: str) -> int:
        with self._lock:
            return self._outstanding.get(key, 0)

    def pick(self, targets: list[Target], exclude: set[str] = frozenset()) -> Target | None:
        """The target with the fewest requests in flight from this process (round-robin among
        equals), skipping ``exclude`` and, while others remain, recently failed ones."""
        now = time.monotonic()
        with self._lock:
            cands = [t for t in targets if t.key not in exclude]
            healthy = [t for t in cands if self._ejected.get(t.key, 0) <= now]
            cands = healthy or cands
            if not cands:
                return None
            least = min(self._outstanding.get(t.key, 0) for t in cands)
            best = [t for t in cands if self._outstanding.get(t.key, 0) == least]
            chosen = best[next(self._rr) % len(best)]
            self._outstanding[chosen.key] = self._outstanding.get(chosen.key, 0) + 1
            return chosen

    def _eject(self, target: Target) -> None:
        with self._lock:
            self._ejected[target.key] = time.monotonic() + self.eject_s

    def _release(self, target: Target, conn: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._outstanding[target.key] = max(0, self._outstanding.get(target.key, 0) - 1)
        pool = self._pool()
        if conn is not None and (target.host, target.port) not in pool:
            pool[(target.host, target.port)] = conn
        elif conn is not None:
            conn.close()

    # -- connections --------------------------------------------------------------------------

    def _pool(self) -> dict:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _conn(self, target: Target) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``target``: this thread's idle one (reused=True) or a new one."""
        conn = self._pool().pop((target.host, target.port), None)
        if conn is not None:
            return conn, True
        return http.client.HTTPConnection(target.host, target.port, timeout=self.connect_timeout), False

    def _send(self, target: Target, method: str, body: bytes, headers: dict[str, str]):
        """One exchange; a kept-alive connection the replica closed meanwhile is retried once
        on a fresh connection (that is not a failure of the replica)."""
        for _ in range(2):
            conn, reused = self._conn(target)
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.settimeout(self.timeout)
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request(method, "/service", body=body, headers=headers)
                return conn, conn.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as e:
                conn.close()
                if not reused:
                    raise ConnectionError(str(e) or type(e).__name__) from e
            except BaseException:
                conn.close()
                raise
        raise ConnectionError("connection dropped twice")

    # -- forwarding ---------------------------------------------------------------------------

    def forward(self, targets: list[Target], method: str, body: bytes, headers: dict[str, str],
                service: str = "") -> Upstream:
        """Send the request to a replica; returns the answer to stream back. Raises
        NoReadyReplica (none given) or ReplicaUnreachable (every try failed)."""
        if not targets:
            raise NoReadyReplica("service %s has no ready replica right now; it may be starting, scaling or "
                                 "recovering: try again shortly (`aiportal service show %s`)" % (service, service))
        hdrs = {h: headers[h] for h in FORWARD_HEADERS if headers.get(h)}
        hdrs["Content-Length"] = str(len(body))
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            target = self.pick(targets, tried)
            if target is None:
                break
            tried.add(target.key)
            try:
                conn, resp = self._send(target, method, body, hdrs)
            except TimeoutError as e:
                # the replica took the request and did not answer in time: not sent again
                self._release(target, None)
                raise ReplicaUnreachable("service %s: replica %s:%d did not answer within %.0fs"
                                         % (service, target.host, target.port, self.timeout)) from e
            except (OSError, http.client.HTTPException) as e:
                self._release(target, None)
                self._eject(target)
                errors.append("%s:%d: %s" % (target.host, target.port, e or type(e).__name__))
                log.info("service %s: replica %s:%d failed (%s); trying another", service, target.host,
                         target.port, e)
                continue
            if resp.status == 503 and attempt < self.max_attempts and len(tried) < len(targets):
                # loading or draining: nothing reached the model; another replica takes it
                resp.read()
                self._release(target, conn if not resp.will_close else None)
                self._eject(target)
                errors.append("%s:%d: answered 503" % (target.host, target.port))
                continue
            return Upstream(self, target, conn, resp, attempt)
        if not errors:
            raise NoReadyReplica("service %s has no ready replica right now; try again shortly" % service)
        raise ReplicaUnreachable("service %s: no replica answered (%s); the portal is replacing failed "
                                 "replicas: try again shortly" % (service, "; ".join(errors)))
