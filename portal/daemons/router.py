"""``aiportal router``: the inference gateway (:mod:`inference.gateway`) on the portal's database.

The gateway serves ``POST|PUT /service/NAME``; this module answers its two questions from the
database, without a query on the request path:

- **who is calling**: ``Authorization: Bearer TOKEN``, an API token of the service's owner (or
  of an admin). Checked tokens are remembered for ``router_refresh_s`` seconds (a revoked token
  stops working within that time); unknown ones too, so a flood of bad tokens costs one query
  per token and interval. Each wrong token counts towards its client address's limit, the same
  count as the API's (``token_failures_per_address`` in ``token_failure_window_s``): then 429
  with Retry-After for each new wrong token from that address until the window has passed; a
  right token always passes (every local account shares 127.0.0.1). The address is nginx's
  ``X-Forwarded-For`` on the unix socket, the peer's on TCP;
- **where the service's replicas are**: the routing table (services and their READY replicas,
  written by the controller in the reconcile cycle) is re-read in the background every
  ``router_refresh_s`` seconds; requests use the table at hand, except that one for a service
  with no ready replica (or an unknown one) reads it again first (at most every 50 ms), so a
  replica that just became READY serves at once. It carries each service's key
  (sealed in the database, opened here once per service and kept in memory): the gateway
  sends it to the replicas, which answer nobody else.

Another user's service is "not found", like an unknown one.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

from sqlmodel import Session, select

from inference.gateway import Gateway, GatewayError, Route, run
from inference.balancer import Target
from inference.controller import Phase
from portal.errors import RateLimitError
from portal.scopes import FULL, Grant
from portal.services import accounts
from portal.models import Service, ServiceReplica, ServiceState
from portal.settings import Settings
from storage.credentials import SecretBox
from storage.errors import CredentialsError

log = logging.getLogger(__name__)
#: a request for a service without ready replicas (or unknown) reads the table again when the
#: one at hand is older than this
MISS_REREAD_S = 0.05


@dataclass(frozen=True)
class RouteRow:
    """A service as the database has it: who owns it, its body limit, its ready replicas (each
    weighed: in a gray release the next generation's replicas weigh ``next_weight``, the others
    the rest; otherwise every replica weighs 100), and its key as sealed (None: a service from
    before keys)."""

    service_id: str
    owner_id: int
    max_body: int
    targets: tuple[Target, ...]
    key_sealed: str | None
    public: bool = False


@dataclass(frozen=True)
class OpenRoute:
    """A service as the router serves it: its owner and its route, the key opened."""

    owner_id: int
    route: Route
    service_id: str = ""
    public: bool = False


def routing_table(db: Session) -> dict[str, RouteRow]:
    """Every service by name: one query for services, one for ready replicas."""
    services = {s.id: s for s in db.exec(select(Service).where(Service.state != ServiceState.DELETING))}
    ready: dict[str, list[Target]] = {sid: [] for sid in services}
    for r in db.exec(select(ServiceReplica).where(ServiceReplica.phase == Phase.READY)):
        svc = services.get(r.service_id)
        if svc is not None and r.host and r.port:
            weight = 100
            if svc.next_weight is not None:
                weight = svc.next_weight if r.generation == svc.next_generation else 100 - svc.next_weight
            ready[r.service_id].append(Target(key=r.id, host=r.host, port=r.port, version=r.version, weight=weight))
    return {s.name: RouteRow(service_id=s.id, owner_id=s.user_id, max_body=int(s.spec.get("max_body_bytes") or 0),
                             targets=tuple(ready[s.id]), key_sealed=s.key_sealed, public=s.public)
            for s in services.values()}


class PortalDirectory:
    """The gateway's :class:`~inference.gateway.Directory` on the portal database."""

    def __init__(self, engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.box = SecretBox(settings.data_key)     # no data key: refused at start-up, with the fix
        #: sealed key -> key in clear ("" when it cannot be opened), for the services of the last table
        self.keys: dict[str, str] = {}
        self.ttl = settings.router_refresh_s
        self.table: dict | None = None
        self.loaded = 0.0
        self._refresh: asyncio.Task | None = None
        self._miss: asyncio.Future | None = None
        self.tokens: dict[str, tuple[float, int | None, bool, Grant]] = {}
        #: calls without a token to public services, per service and client address
        self.public_calls = TokenBucket(settings.public_rate_per_s, settings.public_burst)

    # -- database reads (in a worker thread) ---------------------------------------------------

    def _read_table(self) -> dict[str, OpenRoute]:
        with Session(self.engine) as db:
            table = routing_table(db)
        return self._open_keys(table)

    def _open_keys(self, table: dict[str, RouteRow]) -> dict[str, OpenRoute]:
        """The table with each service's key in clear ("" for a service without one). A key is
        opened once; one that cannot be (another data key sealed it) is logged once, and the
        service's replicas then refuse its requests (401)."""
        keys: dict[str, str] = {}
        out = {}
        for name, row in table.items():
            key, sealed = "", row.key_sealed
            if sealed:
                key = self.keys.get(sealed)
                if key is None:
                    try:
                        key = self.box.open(sealed, "the key of service %r" % name)
                    except CredentialsError as e:
                        log.error("%s; requests to service %s will be refused by its replicas", e, name)
                        key = ""
                keys[sealed] = key
            out[name] = OpenRoute(row.owner_id, Route(name, row.targets, row.max_body, key), row.service_id,
                                  row.public)
        self.keys = keys
        return out

    def _read_caller(self, token: str, client: str = "") -> tuple[int | None, bool, Grant]:
        """Who ``token`` is; a wrong one counts towards ``client``'s limit, the same count as
        the API's (``token_failures_per_address`` in ``token_failure_window_s``): RateLimitError
        once it is reached, for a right token too."""
        limits = accounts.TokenLimits(per_address=self.settings.token_failures_per_address,
                                      window_s=self.settings.token_failure_window_s)
        with Session(self.engine) as db:
            found = accounts.caller_for_token(db, token, self.settings.admin_token_sha256)
            if found is None and client:
                # a right token always passes (see portal/auth.py); a wrong one over the limit: 429
                accounts.wrong_token(db, client, limits)
                db.commit()         # the failure counts (its clean-up query has flushed it already)
            elif db.new or db.dirty:
                db.commit()
            return (found[0].id, found[0].is_admin, found[1]) if found is not None else (None, False, FULL)

    # -- cached answers -------------------------------------------------------------------------

    async def services(self) -> dict:
        if self.table is None:
            await self._load()
            self._refresh = asyncio.ensure_future(self._refresher())
        return self.table

    async def _refresher(self) -> None:
        """Re-read the table every ``ttl`` seconds, whether requests come or not, so a request
        never waits for the database and never meets a table older than that."""
        while True:
            await asyncio.sleep(self.ttl)
            await self._load()

    async def _load(self) -> None:
        try:
            table = await asyncio.to_thread(self._read_table)
        except Exception:
            if self.table is None:
                raise
            log.exception("routing table not refreshed; the last one serves")
            return
        now = time.monotonic()
        self.table, self.loaded = table, now
        self.tokens = {k: v for k, v in self.tokens.items() if now - v[0] <= self.ttl}

    async def _reread(self) -> None:
        """Read the table now, once for every request that asks meanwhile, and at most every
        MISS_REREAD_S (a flood of requests for an unknown service costs little)."""
        if time.monotonic() - self.loaded < MISS_REREAD_S:
            return
        if self._miss is None or self._miss.done():
            self._miss = asyncio.ensure_future(self._load())
        await asyncio.shield(self._miss)

    async def close(self) -> None:
        """Stop the background refresh (the gateway calls it when it stops)."""
        for task in (self._refresh, self._miss):
            if task is not None and not task.done():
                task.cancel()

    async def caller(self, token: str, client: str = "") -> tuple[int | None, bool, Grant]:
        """Who ``token`` is (cached ``ttl`` seconds, unknown tokens too); GatewayError 429 for a
        new wrong token while ``client`` is over its limit of wrong tokens."""
        now = time.monotonic()
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self.tokens.get(key)
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1], hit[2], hit[3]
        try:
            found = await asyncio.to_thread(self._read_caller, token, client)
        except RateLimitError as e:
            raise _too_many(client, e.retry_after) from e
        self.tokens[key] = (time.monotonic(), *found)
        return found

    async def _entry(self, name: str) -> OpenRoute | None:
        entry = (await self.services()).get(name)
        if entry is None or not entry.route.targets:
            # a service deployed, or a replica become READY, since the last read: read again now
            # rather than answer 404/503 for up to router_refresh_s
            await self._reread()
            entry = self.table.get(name)
        return entry

    async def route(self, token: str, name: str, client: str = "") -> Route:
        if not token:
            # without a token only a public service answers; any other, and one that is not there,
            # get the same 401 (nothing said about which services exist)
            # the table at hand, never read again for it: a re-read for a name that is not there
            # would take longer than the answer for a private one, telling them apart
            entry = (await self.services()).get(name)
            if entry is None or not entry.public:
                raise GatewayError(401, "unauthorized", "send 'Authorization: Bearer TOKEN' with an API token of the "
                                   "service's owner, or an invoke key for it (`aiportal token create --service "
                                   "NAME`)", {"WWW-Authenticate": 'Bearer realm="aiportal"'})
            wait = self.public_calls.take((name, client))
            if wait:
                raise GatewayError(429, "rate_limited", "service %s takes at most %g calls a second from one address "
                                   "without a token; send a token to go beyond" % (name, self.public_calls.rate),
                                   {"Retry-After": str(max(1, int(wait + 0.999)))})
            return entry.route
        user_id, is_admin, grant = await self.caller(token, client)
        if user_id is None:
            raise GatewayError(401, "unauthorized", "the API token is unknown, revoked or expired; create a new one "
                               "(`aiportal token create`)", {"WWW-Authenticate": 'Bearer realm="aiportal"'})
        entry = await self._entry(name)
        if entry is None or (entry.owner_id != user_id and not is_admin) or (
                grant.service_id is not None and grant.service_id != entry.service_id):
            # a key bound to another service: the same answer as a service that is not there
            raise GatewayError(404, "unknown_service", "there is no service named %r that you may call; your "
                               "services: `aiportal service list`" % name)
        if not grant.may_call(entry.service_id):
            raise GatewayError(403, "insufficient_scope", "this token may not call services: it has %s; make one "
                               "that may: `aiportal token create --scope services:invoke --service %s`"
                               % (" ".join(grant.scopes or ()), name),
                               {"WWW-Authenticate": 'Bearer realm="aiportal", error="insufficient_scope", '
                                                    'scope="services:invoke"'})
        return entry.route


class TokenBucket:
    """Calls per key (service, client address): ``rate`` a second, ``burst`` at once. Keys idle
    long enough to be full again are forgotten, so memory stays bounded by the active callers."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self.pruned_at = 0.0

    def take(self, key: tuple[str, str], now: float | None = None) -> float:
        """0 when a call may go now (and it is counted), else how many seconds until one may."""
        now = time.monotonic() if now is None else now
        level, at = self.buckets.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - at) * self.rate)
        if len(self.buckets) > 10000 and now - self.pruned_at >= 1.0:      # at most once a second
            full = self.burst / self.rate
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < full}
            self.pruned_at = now
        if level >= 1.0:
            self.buckets[key] = (level - 1.0, now)
            return 0.0
        self.buckets[key] = (level, now)
        return (1.0 - level) / self.rate if self.rate > 0 else 60.0


def _too_many(client: str, retry_after: float) -> GatewayError:
    return GatewayError(429, "rate_limited", "too many wrong API tokens from %s; try again in %d s with a valid "
                        "token (`aiportal token create`)" % (client, max(1, int(retry_after))),
                        {"Retry-After": str(max(1, int(retry_after)))})


def serve(settings: Settings, engine, listen: str, ready=None) -> None:
    gateway = Gateway(PortalDirectory(engine, settings), timeout=settings.router_timeout_s)
    run(gateway, listen, ready)
