"""Public services: a service its owner makes callable without a token answers anyone, held by
a rate limit per service and client address; every other service answers a call without a
token with the same 401, whether it exists or not (portal/daemons/router.py)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from inference.gateway import GatewayError
from portal.daemons.router import PortalDirectory, TokenBucket
from tests.portal.conftest import bearer
from tests.portal.test_services_api import body


def _ask(directory, token, name, client="192.0.2.1"):
    async def go():
        try:
            route = await directory.route(token, name, client)
        except GatewayError as e:
            return e.status, e.code, e.headers.get("Retry-After")
        return 200, route.service, None
    return asyncio.run(go())


def test_token_bucket_table():
    b = TokenBucket(rate=2.0, burst=3)
    k = ("svc", "a")
    assert [b.take(k, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(k, now=0.0) == pytest.approx(0.5)            # empty: one more in 1/rate s
    assert b.take(k, now=0.5) == 0.0                            # refilled one
    assert b.take(("svc", "b"), now=0.5) == 0.0                 # another address has its own
    assert b.take(k, now=10.0) == 0.0 and b.buckets[k][0] == pytest.approx(2.0)    # full again, never over


def test_a_public_service_answers_without_a_token_and_a_private_one_never_says_it_exists(
        client, tokens, fake_backend, image, model_dir, engine, settings):
    alice = bearer(tokens["alice"])
    r = client.post("/api/v1/services", headers=alice, json=body(image, model_dir, public=True))
    assert r.status_code == 201 and r.get_json()["public"] is True
    assert client.post("/api/v1/services", headers=alice,
                       json=body(image, model_dir, name="private")).get_json()["public"] is False
    limited = replace(settings, public_rate_per_s=1.0, public_burst=2)
    directory = PortalDirectory(engine, limited)
    assert _ask(directory, "", "toy")[:2] == (200, "toy")
    assert _ask(directory, "", "toy")[:2] == (200, "toy")
    status, code, retry = _ask(directory, "", "toy")            # over the burst: 429, Retry-After
    assert (status, code) == (429, "rate_limited") and int(retry) >= 1
    assert _ask(directory, "", "toy", client="192.0.2.2")[:2] == (200, "toy")      # another address
    assert _ask(directory, tokens["alice"], "toy")[:2] == (200, "toy")             # a token: no limit of this kind
    # a private service and one that is not there: the same 401 without a token
    assert _ask(directory, "", "private")[:2] == (401, "unauthorized")
    loaded = directory.loaded
    assert _ask(directory, "", "nothing-here")[:2] == (401, "unauthorized")
    assert directory.loaded == loaded       # no re-read for it: no slower answer telling it apart
    # a wrong token to a public service is still a wrong token
    assert _ask(directory, "wrong", "toy")[:2] == (401, "unauthorized")
    # the owner makes it private again; another user cannot change it
    assert client.post("/api/v1/services/toy/access", headers=bearer(tokens["bob"]),
                       json={"public": False}).status_code == 404
    r = client.post("/api/v1/services/toy/access", headers=alice, json={"public": False})
    assert r.status_code == 200 and r.get_json()["public"] is False
    assert _ask(PortalDirectory(engine, limited), "", "toy")[:2] == (401, "unauthorized")
    r = client.post("/api/v1/services/toy/access", headers=alice, json={"public": "yes"})
    assert r.status_code == 422


def test_a_call_without_a_token_reaches_a_public_services_route_through_the_gateway(
        client, tokens, fake_backend, image, model_dir, engine, settings):
    """Through a real gateway on TCP: no token, a public service without ready replicas: 503
    (it got past the token check); a private one: 401."""
    import http.client
    import json

    from tests.conftest import free_port
    from tests.inference.conftest import GatewayThread
    alice = bearer(tokens["alice"])
    client.post("/api/v1/services", headers=alice, json=body(image, model_dir, public=True))
    client.post("/api/v1/services", headers=alice, json=body(image, model_dir, name="private"))
    gw = GatewayThread(PortalDirectory(engine, settings), free_port(range(9150, 9200)))
    try:
        def post(name):
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
            conn.request("POST", "/service/%s" % name, body=b"x", headers={"Content-Type": "text/plain"})
            r = conn.getresponse()
            out = json.loads(r.read())
            conn.close()
            return r.status, out["error"]
        assert post("toy") == (503, "no_ready_replica")
        assert post("private") == (401, "unauthorized")
    finally:
        gw.close()


def test_the_services_page_makes_a_service_public_and_private_again(client, users, tokens, fake_backend, image,
                                                                   model_dir):
    from tests.portal.conftest import csrf_of, login
    assert client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                       json=body(image, model_dir)).status_code == 201
    login(client)
    page = client.get("/services").get_data(as_text=True)
    assert "Make public" in page and ">public</span>" not in page
    assert client.post("/services/toy/public", data={}).status_code == 400        # no CSRF token
    r = client.post("/services/toy/public", data={"csrf": csrf_of(client, "/services")}, follow_redirects=True)
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and "Make private" in page and ">public</span>" in page
    r = client.post("/services/toy/private", data={"csrf": csrf_of(client, "/services")}, follow_redirects=True)
    assert "Make public" in r.get_data(as_text=True)
    assert client.get("/api/v1/services/toy", headers=bearer(tokens["alice"])).get_json()["public"] is False
