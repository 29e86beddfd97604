"""The API keeps to its OpenAPI document (through the Flask test client, no cluster): unknown
body fields refused by every operation, naming them; bodies and methods the document does not
allow; query parameters that do not parse; the followed log's events as declared. The live
check of the whole document is tests/portal/test_openapi_fuzz.py (schemathesis, every check)."""
from __future__ import annotations

import json
import re

import jsonschema_rs
import pytest
from sqlmodel import Session, select

import portal.api  # noqa: F401 (registers every view in the route table)
from portal.api.openapi import openapi_document
from portal.api.operations import OPERATIONS
from portal.logs.stream import sse
from portal.models import ApiToken
from tests.portal.conftest import bearer


def _url(op) -> str:
    """The operation's URL with each path parameter filled in (1 for a number, else a name)."""
    return "/api/v1" + re.sub(r"<(int:)?(?:path:)?(\w+)>", lambda m: "1" if m.group(1) else "x", op.rule)


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: "%s %s" % (op.method, op.rule))
def test_every_operation_refuses_unknown_body_fields_naming_them(client, tokens, fake_backend, op):
    r = client.open(_url(op), method=op.method, headers=bearer(tokens["alice"]),
                    json={"zz_unknown": 1, "scope": "jobs:read"})
    assert r.status_code == 422, (r.status_code, r.get_data(as_text=True)[:300])
    assert re.search(r"unknown fields scope, zz_unknown\b", r.get_json()["errors"]["body"]), r.get_json()
    assert fake_backend.submitted == []


def test_a_token_asked_for_with_an_unknown_field_is_refused_and_not_made(client, tokens, engine):
    with Session(engine) as s:
        before = len(s.exec(select(ApiToken)).all())
    r = client.post("/api/v1/tokens", headers=bearer(tokens["alice"]), json={"name": "ci", "scope": "jobs:read"})
    assert r.status_code == 422 and "scope" in r.get_json()["errors"]["body"]
    with Session(engine) as s:
        assert len(s.exec(select(ApiToken)).all()) == before


def test_whole_numbers_written_with_a_fraction_are_whole_numbers(client, tokens):
    r = client.post("/api/v1/tokens", headers=bearer(tokens["alice"]), json={"name": "ci", "expires_days": 30.0})
    assert r.status_code == 201, r.get_json()
    r = client.post("/api/v1/tokens", headers=bearer(tokens["alice"]), json={"name": "ci", "expires_days": 30.5})
    assert r.status_code == 422 and "expires_days" in r.get_json()["errors"]


def test_the_document_refuses_unknown_fields_of_every_body_and_allows_422_everywhere():
    doc = openapi_document()
    for path, ops in doc["paths"].items():
        for method, entry in ops.items():
            assert "422" in entry["responses"], (method, path)
            schema = entry.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema:
                body = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
                assert body["additionalProperties"] is False, (method, path)


def test_a_method_a_path_does_not_serve_gets_405_with_allow(client, tokens):
    doc = openapi_document()
    for path, ops in doc["paths"].items():
        url = "/api/v1" + re.sub(r"\{\w+\}", "1", path)
        r = client.open(url, method="TRACE", headers=bearer(tokens["alice"]))
        assert r.status_code == 405, (path, r.status_code)
        allowed = {m.strip() for m in r.headers["Allow"].split(",")}
        assert {m.upper() for m in ops} <= allowed, (path, allowed)


@pytest.mark.parametrize("url, name", [
    ("/api/v1/jobs/x/log?follow=notabool", "follow"),
    ("/api/v1/images/builds/1/log?follow=2", "follow"),
    ("/api/v1/jobs/x/log?offset=abc", "offset"),
    ("/api/v1/jobs?limit=ten", "limit"),
    ("/api/v1/jobs?state=notastate", "state"),
])
def test_a_query_parameter_that_does_not_parse_gets_422_naming_it(client, tokens, url, name):
    r = client.get(url, headers=bearer(tokens["alice"]))
    assert r.status_code == 422 and name in r.get_json()["errors"], r.get_json()


@pytest.mark.parametrize("value", ["1", "true", "yes", "0", "false", "no"])
def test_follow_takes_the_usual_spellings_of_true_and_false(client, tokens, value):
    r = client.get("/api/v1/jobs/x/log?follow=" + value, headers=bearer(tokens["alice"]))
    assert r.status_code == 404       # parsed; no such job


def _events(text: str) -> list[dict]:
    """Server-Sent Events as schemathesis reads them to check them against the document."""
    from schemathesis.core.deserialization import _parse_sse_events
    return _parse_sse_events(text.encode())


@pytest.mark.parametrize("path", ["/jobs/{job_id}/log", "/images/builds/{build_id}/log"])
def test_the_followed_logs_events_match_their_declared_schema(path):
    schema = openapi_document()["paths"][path]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    stream = ("retry: 2000\n\n" + sse("log", {"text": "step 1, loss = 2.0\n", "offset": 19}, 19)
              + ": heartbeat\n\n" + sse("end", {"state": "ended"}))
    events = _events(stream)
    assert [e["event"] for e in events] == ["log", "end"]
    for event in events:
        assert jsonschema_rs.validator_for(schema).is_valid(event), event
        branch = next(b for b in schema["oneOf"] if b["properties"]["event"]["const"] == event["event"])
        content = branch["properties"]["data"]["contentSchema"]
        assert jsonschema_rs.validator_for(content).is_valid(json.loads(event["data"])), event
    # what the document declared before: a string, which no event is
    assert not jsonschema_rs.validator_for({"type": "string"}).is_valid(events[0])


_JOB = {"image": "/srv/aiportal/shared/images/base/debian-python.sif", "node_type": "1card", "command": "true"}


@pytest.mark.parametrize("field, value", [
    ("sweep", False), ("sweep", {"LR": [[0.1]]}), ("sweep", {"LR": True}), ("env", {"A": {"b": 1}}),
    ("env", {"A": [1]}), ("command", "   "), ("image", " "), ("node_type", ""),
])
def test_a_job_field_the_document_does_not_allow_is_refused_naming_it(client, tokens, fake_backend, field, value):
    """The bodies schemathesis found accepted against the document: refused now, as it says."""
    r = client.post("/api/v1/scripts", headers=bearer(tokens["alice"]), json={**_JOB, field: value})
    assert r.status_code == 422 and field in r.get_json()["errors"], r.get_json()
    schema = openapi_document()["components"]["schemas"]["JobCreate"]
    assert not jsonschema_rs.validator_for(schema).is_valid({**_JOB, field: value})


@pytest.mark.parametrize("field, value", [("name", None), ("time_limit", None), ("env", None), ("sweep", None),
                                          ("inputs", None), ("env", {"A": 1, "B": None}), ("sweep", {"LR": 0.1})])
def test_what_the_document_allows_a_job_is_accepted(client, tokens, fake_backend, field, value):
    schema = openapi_document()["components"]["schemas"]["JobCreate"]
    assert jsonschema_rs.validator_for(schema).is_valid({**_JOB, field: value})
    r = client.post("/api/v1/scripts", headers=bearer(tokens["alice"]), json={**_JOB, field: value})
    assert r.status_code != 422 or field not in r.get_json()["errors"], r.get_json()
