"""The OpenAPI document, fuzzed with schemathesis against a running portal (gunicorn, real
Slurm): no request may get a 500, and every answer must match the document.

Runs as bob (not an admin: drains are refused, never performed); revoking tokens is left out
so the run keeps its own token. "Schema-valid data is accepted" is not checked: the document
gives shapes, while whether an image, a node type or a data location works on this site is
the service's to say (422 with the field), e.g. an image path that does not exist."""
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

import portal.api  # noqa: F401 (registers every view in the route table)
from portal.api.openapi import openapi_document

pytestmark = [pytest.mark.portal, pytest.mark.slurm]


schema = schemathesis.openapi.from_dict(openapi_document()).exclude(method="DELETE", path="/tokens/{token_id}")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_and_matches_its_document(case, live_portal):
    case.call_and_validate(base_url=live_portal.url + "/api/v1",
                           headers={"Authorization": "Bearer " + live_portal.tokens["bob"]}, timeout=30,
                           excluded_checks=[positive_data_acceptance])


def test_document_lists_every_endpoint_of_the_api(app):
    doc = openapi_document()
    documented = {(method.upper(), "/api/v1" + path) for path, ops in doc["paths"].items() for method in ops}
    routes = {(m, r.rule) for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")
              for m in r.methods - {"HEAD", "OPTIONS"}}
    # every route's template, with its converters written as OpenAPI parameters
    as_openapi = {(m, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r)) for m, r in routes}
    # one output file (/outputs/{rel}) is a download, documented with its folder's listing
    assert {x for x in as_openapi - documented if "{rel}" not in x[1]} == set()
