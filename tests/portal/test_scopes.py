"""Scoped API tokens and invoke keys (portal/scopes.py): the table of what each operation needs,
tokens that may do only what their scopes name, through the API and the router's directory."""
from __future__ import annotations

import asyncio

import pytest

from portal import scopes
from portal.api import OPERATIONS
from portal.scopes import Grant
from tests.portal.conftest import bearer
from tests.portal.test_services_api import body


def test_every_operation_needs_a_known_scope_or_full_access():
    for op in OPERATIONS:
        need = scopes.needed(op.method, op.rule)
        assert need is None or need == "" or need in scopes.SCOPES, (op.method, op.rule, need)
    # managing tokens and sessions: full access only (a scoped token cannot widen itself)
    for method, rule in [("POST", "/tokens"), ("GET", "/tokens"), ("DELETE", "/tokens/<int:token_id>"),
                         ("POST", "/sessions/revoke"), ("GET", "/nothing-yet")]:
        assert scopes.needed(method, rule) is None
    assert scopes.needed("GET", "/jobs/<job_id>/log") == "jobs:read"
    assert scopes.needed("POST", "/jobs") == "jobs:write"
    assert scopes.needed("DELETE", "/services/<name>") == "services:manage"
    assert scopes.needed("POST", "/cluster/nodes/<node>/drain") == "admin"
    assert scopes.needed("GET", "/me") == ""


@pytest.mark.parametrize("grant, scope, allowed", [
    (Grant(), None, True), (Grant(), "jobs:write", True),
    (Grant(("jobs:read",)), "jobs:read", True), (Grant(("jobs:read",)), "jobs:write", False),
    (Grant(("jobs:read",)), None, False), (Grant(("jobs:read",)), "", True),
    (Grant(("services:invoke",), "s1"), "services:manage", False),
])
def test_grant_allows(grant, scope, allowed):
    assert grant.allows(scope) is allowed


def test_grant_may_call():
    assert Grant().may_call("s1") and Grant(("services:invoke",)).may_call("s1")
    assert Grant(("services:invoke",), "s1").may_call("s1") and not Grant(("services:invoke",), "s1").may_call("s2")
    assert not Grant(("jobs:read",)).may_call("s1")


def _token(client, token, **req):
    r = client.post("/api/v1/tokens", headers=bearer(token), json=req)
    return r.status_code, r.get_json()


def test_a_read_only_token_reads_jobs_and_nothing_more(client, tokens):
    status, made = _token(client, tokens["alice"], name="ro", scopes=["jobs:read"])
    assert status == 201
    ro = bearer(made["token"])
    assert client.get("/api/v1/jobs", headers=ro).status_code == 200
    assert client.get("/api/v1/me", headers=ro).status_code == 200
    r = client.post("/api/v1/jobs", headers=ro, json={"image": "x"})
    assert r.status_code == 403 and r.get_json()["error"] == "insufficient_scope"
    assert "jobs:write" in r.get_json()["message"] and 'scope="jobs:write"' in r.headers["WWW-Authenticate"]
    assert client.get("/api/v1/services", headers=ro).status_code == 403
    assert client.get("/api/v1/datasources", headers=ro).status_code == 403
    # it cannot make itself a wider token, nor list or revoke tokens
    assert _token(client, made["token"], name="wider")[0] == 403
    assert client.get("/api/v1/tokens", headers=ro).status_code == 403
    listed = {t["id"]: t for t in client.get("/api/v1/tokens", headers=bearer(tokens["alice"])).get_json()["tokens"]}
    assert listed[made["id"]]["scopes"] == ["jobs:read"] and listed[made["id"]]["service_id"] is None
    assert all(t["scopes"] is None for i, t in listed.items() if i != made["id"])    # full access


@pytest.mark.parametrize("req, field", [
    ({"scopes": ["jobs:everything"]}, "scopes"),
    ({"scopes": []}, "scopes"),
    ({"scopes": ["admin"]}, "scopes"),                  # alice is no admin
    ({"service": "nope"}, "service"),
    ({"scopes": "jobs:read"}, "scopes"),
])
def test_bad_scopes_are_refused_naming_the_field(client, tokens, req, field):
    status, ans = _token(client, tokens["alice"], **req)
    assert status == 422 and field in str(ans), ans


def test_an_invoke_key_calls_its_one_service_and_nothing_else(client, tokens, fake_backend, image, model_dir,
                                                            engine, settings):
    from inference.gateway import GatewayError
    from portal.daemons.router import PortalDirectory
    for name in ("toy", "toy2"):
        assert client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                           json=body(image, model_dir, name=name)).status_code == 201
    # bob cannot bind a key to alice's service: the same answer as a service that is not there
    assert _token(client, tokens["bob"], service="toy")[0] == 422
    status, key = _token(client, tokens["alice"], name="app", service="toy")
    assert status == 201
    listed = {t["id"]: t for t in client.get("/api/v1/tokens", headers=bearer(tokens["alice"])).get_json()["tokens"]}
    assert listed[key["id"]]["scopes"] == ["services:invoke"] and listed[key["id"]]["service_id"]
    _, reader = _token(client, tokens["alice"], scopes=["jobs:read"])

    async def ask(token, name):
        try:
            await PortalDirectory(engine, settings).route(token, name)
        except GatewayError as e:
            return e.status, e.code
        return 200, ""

    assert asyncio.run(ask(key["token"], "toy")) == (200, "")
    assert asyncio.run(ask(key["token"], "toy2")) == (404, "unknown_service")
    assert asyncio.run(ask(reader["token"], "toy")) == (403, "insufficient_scope")
    assert asyncio.run(ask(tokens["alice"], "toy2")) == (200, "")                   # full access: any of hers
    # the key does nothing through the API
    for method, path in [("GET", "/api/v1/jobs"), ("GET", "/api/v1/services"), ("DELETE", "/api/v1/services/toy"),
                         ("POST", "/api/v1/tokens")]:
        assert client.open(path, method=method, headers=bearer(key["token"]), json={}).status_code == 403, path
    # revoked: refused by the router within router_refresh_s (a fresh directory here)
    assert client.delete("/api/v1/tokens/%d" % key["id"], headers=bearer(tokens["alice"])).status_code == 204
    assert asyncio.run(ask(key["token"], "toy")) == (401, "unauthorized")


def test_an_invoke_key_has_no_other_scope(client, tokens, fake_backend, image, model_dir):
    assert client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                       json=body(image, model_dir)).status_code == 201
    status, ans = _token(client, tokens["alice"], service="toy", scopes=["services:invoke", "services:manage"])
    assert status == 422 and "scopes" in str(ans)
    # and a bound grant allows nothing but calling, whatever its scopes say
    bound = Grant(("services:invoke", "services:manage"), "some-service")
    assert not bound.allows("services:manage") and not bound.allows("jobs:read") and bound.allows("")
    assert bound.allows("services:invoke") and bound.may_call("some-service")
