"""Readiness and load probes of a replica: ``GET /healthz`` and ``GET /stats`` (with the
service's key: the runtime answers /stats only with it), with a timeout. An adapter (HTTP);
what to do with the answers is :mod:`inference.controller`'s."""
from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass

from inference.runtime import KEY_HEADER


@dataclass(frozen=True)
class ProbeResult:
    ready: bool
    status: int | None          #: HTTP status of /healthz, None when there was no answer
    detail: str                 #: the replica's state, or why the probe failed
    inflight_seconds: float | None = None
    in_flight: int | None = None
    requests_total: int | None = None


def _get(host: str, port: int, path: str, timeout: float, key: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Connection": "close"}
    if key:
        headers[KEY_HEADER] = key
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(65536)
    finally:
        conn.close()


def probe(host: str, port: int, timeout: float = 1.0, key: str | None = None) -> ProbeResult:
    """One probe: ready when /healthz answers 200 within ``timeout``; load from /stats, asked
    with the service's ``key`` (None: a replica without one)."""
    try:
        status, body = _get(host, port, "/healthz", timeout)
    except (OSError, socket.timeout, http.client.HTTPException) as e:
        return ProbeResult(False, None, "%s:%d: %s" % (host, port, e or type(e).__name__))
    try:
        detail = str(json.loads(body).get("status", ""))
    except (ValueError, AttributeError):
        detail = body[:200].decode("utf-8", "replace")
    if status != 200:
        return ProbeResult(False, status, detail or "healthz answered %d" % status)
    try:
        st, raw = _get(host, port, "/stats", timeout, key)
        stats = json.loads(raw) if st == 200 else {}
    except (OSError, socket.timeout, http.client.HTTPException, ValueError):
        stats = {}
    return ProbeResult(True, status, detail, stats.get("inflight_seconds"), stats.get("in_flight"),
                       stats.get("requests_total"))
