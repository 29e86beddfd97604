"""What the gateway asks its directory, and what it gets back: the :class:`Directory`
protocol (the portal implements it on its database) and the :class:`Route` it answers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from inference.balancer import Target


@dataclass(frozen=True)
class Route:
    """Where a caller's request for a service may go."""
    service: str
    targets: tuple[Target, ...]     #: the service's ready replicas
    max_body: int = 0               #: bytes; 0: no limit of the service's own
    #: the service's key, sent to its replicas in X-Aiportal-Key; "": a service without one
    key: str = field(default="", repr=False)


class Directory(Protocol):
    async def route(self, token: str, name: str, client: str = "") -> Route:
        """The service ``name`` as the caller of ``token`` (from the address ``client``; "" when
        the request has none) may use it; raises GatewayError (401 for a bad or missing token, 403
        for a token without the scope, 404
        for a service that is unknown or not theirs, 429 for an address that sent too many
        wrong tokens)."""
