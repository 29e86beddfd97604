"""Wrong tokens at /service/NAME count towards the caller's address like the API's: the router's
directory (portal/daemons/router.py) refuses an address over the limit with 429, a right token
too, and the API and the router share the count."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

from inference.gateway import GatewayError
from inference.gateway.http1 import Request
from inference.gateway.server import client_of
from portal.daemons.router import PortalDirectory
from tests.portal.conftest import bearer
from tests.portal.test_services_api import body


def _ask(directory, token, name, client):
    async def go():
        try:
            await directory.route(token, name, client)
        except GatewayError as e:
            return e.status, e.code, e.headers.get("Retry-After")
        return 200, "", None
    return asyncio.run(go())


def test_wrong_tokens_at_the_router_are_limited_per_address(client, tokens, fake_backend, image, model_dir,
                                                            engine, settings):
    assert client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                       json=body(image, model_dir)).status_code == 201
    limited = replace(settings, token_failures_per_address=3, token_failure_window_s=300)
    directory = PortalDirectory(engine, limited)
    for i in range(3):
        assert _ask(directory, "wrong-%d" % i, "toy", "10.0.0.9")[:2] == (401, "unauthorized")
    status, code, retry = _ask(directory, "wrong-more", "toy", "10.0.0.9")
    assert (status, code) == (429, "rate_limited") and 0 < int(retry) <= 300
    # a right token still works from there (every local account shares 127.0.0.1 behind nginx:
    # wrong tokens must not lock everyone out), and from another address
    assert _ask(directory, tokens["alice"], "toy", "10.0.0.9")[0] == 200
    assert _ask(directory, "wrong-x", "toy", "10.0.0.8")[:2] == (401, "unauthorized")
    # a fresh directory (another router process) reads the same count from the database
    assert _ask(PortalDirectory(engine, limited), "wrong-y", "toy", "10.0.0.9")[:2] == (429, "rate_limited")
    # the API counts the same failures (the same key and query: portal.services.accounts)
    from sqlmodel import Session
    from portal.errors import RateLimitError
    from portal.services import accounts
    with Session(engine) as db:
        with pytest.raises(RateLimitError):
            accounts.check_token_limit(db, "10.0.0.9", accounts.TokenLimits(per_address=3, window_s=300))
        accounts.check_token_limit(db, "10.0.0.8", accounts.TokenLimits(per_address=3, window_s=300))


def test_the_callers_address_is_the_peers_on_tcp_and_nginxs_on_the_unix_socket():
    tcp = SimpleNamespace(get_extra_info=lambda k: ("192.0.2.7", 51000) if k == "peername" else None)
    unix = SimpleNamespace(get_extra_info=lambda k: "" if k == "peername" else None)
    req = Request("POST", "/service/x", "HTTP/1.1", {"x-forwarded-for": "198.51.100.1, 203.0.113.5"})
    assert client_of(req, tcp) == "192.0.2.7"                  # a header a client sends is not believed
    assert client_of(req, unix) == "203.0.113.5"               # nginx's $remote_addr, the last one
    assert client_of(Request("POST", "/service/x", "HTTP/1.1", {}), unix) == "unix-socket"
