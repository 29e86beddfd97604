"""Endpoint files: each replica writes ``endpoint.json`` (host, port, version, job id) into its
folder once it listens; the portal reads it to find the replica (also after a restart)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from inference.errors import EndpointError

ENDPOINT_NAME = "endpoint.json"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    version: str
    job_id: str

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)


def parse_endpoint(text: str, source: str = ENDPOINT_NAME) -> Endpoint:
    """Pure: an Endpoint from the file's text; EndpointError says what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise EndpointError("%s is not JSON (%s)" % (source, e)) from None
    if not isinstance(raw, dict):
        raise EndpointError("%s is not a JSON object" % source)
    host, port = raw.get("host"), raw.get("port")
    if not isinstance(host, str) or not host or any(c in host for c in "/@ \n"):
        raise EndpointError("%s: host %r is not a host name" % (source, host))
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise EndpointError("%s: port %r is not a TCP port" % (source, port))
    return Endpoint(host, port, str(raw.get("version") or ""), str(raw.get("job_id") or ""))


def read_endpoint(folder: str | Path, job_id: str | None = None) -> Endpoint | None:
    """The endpoint a replica wrote into ``folder``; None while there is none yet, or while the
    file there is an older job's (a resubmitted replica reuses its folder)."""
    path = Path(folder) / ENDPOINT_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise EndpointError("cannot read %s: %s" % (path, e)) from e
    ep = parse_endpoint(text, str(path))
    if job_id is not None and ep.job_id and ep.job_id != str(job_id):
        return None
    return ep
