"""The gateway's replica side: kept-alive connections to replicas, pooled per ``host:port``,
and one request's exchange up to the head of the replica's answer."""
from __future__ import annotations

import asyncio
import socket

from inference.balancer import Target
from inference.gateway.http1 import MAX_HEAD


class Upstream:
    """One kept-alive connection to a replica."""
    __slots__ = ("key", "reader", "writer")

    def __init__(self, key: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.key, self.reader, self.writer = key, reader, writer

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class Dropped(Exception):
    """The replica closed or reset the connection before its answer began."""


class UpstreamPool:
    """Idle connections to replicas (at most ``max_idle`` per ``host:port``), used from the
    gateway's event loop only."""

    def __init__(self, *, timeout: float, connect_timeout: float, max_idle: int):
        self.timeout, self.connect_timeout, self.max_idle = timeout, connect_timeout, max_idle
        self.idle: dict[tuple[str, int], list[Upstream]] = {}

    async def connect(self, target: Target) -> tuple[Upstream, bool]:
        """An idle connection to ``target`` (and True), or a new one (and False)."""
        idle = self.idle.get((target.host, target.port))
        while idle:
            up = idle.pop()
            if up.usable():
                return up, True
            up.close()
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(target.host, target.port, limit=MAX_HEAD)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Upstream((target.host, target.port), reader, writer), False

    async def send(self, target: Target, out: bytes) -> tuple[Upstream, int, dict[str, str]]:
        """Send one request; (connection, status, headers) once the answer's head arrived. An
        idle connection the replica closed meanwhile is retried once on a fresh one. Raises
        TimeoutError when the head takes over ``timeout``, :class:`Dropped` (or OSError,
        IncompleteReadError, ValueError for a malformed head) when the replica failed."""
        for _ in range(2):
            up, reused = await self.connect(target)
            try:
                up.writer.write(out)
                async with asyncio.timeout(self.timeout):
                    try:
                        head = await up.reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError as e:
                        if e.partial:
                            raise
                        raise Dropped("connection closed before the answer") from e
                    except ConnectionError as e:
                        raise Dropped(str(e) or type(e).__name__) from e
            except Dropped:
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
        raise Dropped("connection dropped twice")

    async def skip_body(self, up: Upstream, headers: dict[str, str]) -> None:
        """Read and drop an answer's body (e.g. a 503's), then keep the connection."""
        n = int(headers.get("content-length", "0") or 0)
        async with asyncio.timeout(self.connect_timeout):
            await up.reader.readexactly(n)
        self.release(up, headers)

    def release(self, up: Upstream, headers: dict[str, str]) -> None:
        """A connection whose answer was read whole: kept idle, or closed when the replica
        asked for that or enough are idle already."""
        if "close" in headers.get("connection", "").lower() or not up.usable():
            up.close()
            return
        idle = self.idle.setdefault(up.key, [])
        if len(idle) < self.max_idle:
            idle.append(up)
        else:
            up.close()

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self.idle.values():
            for up in idle:
                up.close()
        self.idle.clear()
