"""Which replica gets a request: the gateway's balancing policy (no I/O; the gateway in
:mod:`inference.gateway` does the forwarding, and the portal's router process runs it).

- **least outstanding requests**: each request goes to the ready replica with the fewest
  requests this gateway has in flight to it; ties are broken round-robin, so sequential
  requests spread too;
- **weights** (gray release): when ready replicas run versions of different weights, the
  version is picked first, in proportion to the weights, then the least loaded replica of it
  (a version of weight 0 takes requests only when nothing else is ready);
- **ejection**: a replica that refused or dropped a connection, or answered 503, is left out of
  the picks for ``eject_s`` seconds while others remain.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One ready replica in a service's routing table (the portal builds these from its
    database: ``Target(key=replica.id, host=..., port=..., version=..., weight=...)``)."""
    key: str        #: the replica id
    host: str
    port: int
    version: str = ""
    weight: int = 100


class Balancer:
    """The policy's state: requests in flight per replica, ejections, a round-robin counter.
    Used from one thread (the gateway's event loop)."""

    def __init__(self, eject_s: float = 5.0):
        self.eject_s = eject_s
        self._outstanding: dict[str, int] = {}
        self._ejected: dict[str, float] = {}
        self._rr = itertools.count()
        self._walk = itertools.count()

    def outstanding(self, key: str) -> int:
        return self._outstanding.get(key, 0)

    def pick(self, targets: list[Target] | tuple[Target, ...], exclude: set[str] = frozenset()) -> Target | None:
        """The target to send the next request to (and count it in flight), or None when every
        one is excluded. Recently failed targets are skipped while others remain. With
        several versions of different weights, the version is chosen first, in proportion to
        the weights (weight 0: only when no weighted one is left), then the least loaded
        replica of that version."""
        now = time.monotonic()
        cands = [t for t in targets if t.key not in exclude]
        cands = [t for t in cands if self._ejected.get(t.key, 0) <= now] or cands
        cands = [t for t in cands if t.weight > 0] or cands
        if not cands:
            return None
        n = next(self._rr)
        weights: dict[str, int] = {}
        for t in cands:
            weights.setdefault(t.version, t.weight)
        if len(weights) > 1 and len(set(weights.values())) > 1:
            # a deterministic walk of the weight line: 7919 is prime, so consecutive picks
            # visit every point once per cycle and each version gets exactly its share
            total = sum(weights.values())
            point = (next(self._walk) * 7919) % total
            for version, w in sorted(weights.items()):
                point -= w
                if point < 0:
                    break
            cands = [t for t in cands if t.version == version]
        least = min(self._outstanding.get(t.key, 0) for t in cands)
        best = [t for t in cands if self._outstanding.get(t.key, 0) == least]
        chosen = best[n % len(best)]
        self._outstanding[chosen.key] = self._outstanding.get(chosen.key, 0) + 1
        return chosen

    def done(self, target: Target) -> None:
        """The request sent to ``target`` is over (answered or failed)."""
        self._outstanding[target.key] = max(0, self._outstanding.get(target.key, 0) - 1)

    def eject(self, target: Target) -> None:
        self._ejected[target.key] = time.monotonic() + self.eject_s
