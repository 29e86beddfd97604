"""HTTP/1.x on the gateway's client side: the request head parsed into a :class:`Request`,
answers the gateway gives itself (:class:`GatewayError` as JSON), chunked bodies. No I/O
beyond the stream reader it is handed."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
#: the longest request (or replica answer) head read, in bytes
MAX_HEAD = 64 * 1024
#: bytes relayed per read of a replica's answer
CHUNK = 64 * 1024


class GatewayError(Exception):
    """An answer the gateway gives itself: status, a code and a message naming the fix."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


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


def answer_head(status: int, headers: dict[str, str], close: bool) -> bytes:
    """The head of an answer to the client (``Connection: close`` when ``close``)."""
    lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status"))]
    lines += ["%s: %s" % kv for kv in headers.items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_answer(e: GatewayError, close: bool) -> bytes:
    body = json.dumps({"error": e.code, "message": e.message}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **e.headers}
    return answer_head(e.status, headers, close) + body


class BodyTooLarge(GatewayError):
    """413 in the middle of a chunked body: ``pending`` is the size of the chunk whose size
    line was read but not its data (for :func:`discard_chunked`)."""

    def __init__(self, message: str, pending: int):
        super().__init__(413, "too_large", message)
        self.pending = pending


async def read_chunked(reader: asyncio.StreamReader, service: str, max_body: int) -> bytes:
    """A chunked request body for ``service``; :class:`BodyTooLarge` once it grows over
    ``max_body`` (0: no limit), 400 when it is malformed."""
    parts, total = [], 0
    while True:
        size = _chunk_size(await reader.readuntil(b"\r\n"))
        if size is None:
            raise GatewayError(400, "bad_request", "malformed chunked body")
        if size == 0:
            await _skip_trailers(reader)
            return b"".join(parts)
        total += size
        if max_body and total > max_body:
            raise BodyTooLarge("the body is over %d bytes, the most service %s takes" % (max_body, service), size)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise GatewayError(400, "bad_request", "malformed chunked body")


async def discard(reader: asyncio.StreamReader, n: int) -> None:
    """Read ``n`` bytes and throw them away, CHUNK at a time (never more in memory)."""
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)


async def discard_chunked(reader: asyncio.StreamReader, cap: int, pending: int | None = None) -> bool:
    """Read a chunked body to its end and throw it away: True once it ended; False when its
    chunks add up to more than ``cap`` bytes or it is malformed (the rest is left unread).
    ``pending``: the size of a chunk whose size line was read but not its data."""
    total, size = 0, pending
    while True:
        if size is None:
            size = _chunk_size(await reader.readuntil(b"\r\n"))
            if size is None:
                return False
            if size == 0:
                await _skip_trailers(reader)
                return True
        total += size
        if total > cap:
            return False
        await discard(reader, size)
        if await reader.readexactly(2) != b"\r\n":
            return False
        size = None


def _chunk_size(line: bytes) -> int | None:
    """The size on a chunk's size line; None when it is not a hexadecimal number."""
    text = line.split(b";", 1)[0].strip()
    if not text or text.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(text, 16)


async def _skip_trailers(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass
