"""The OpenAPI document, fuzzed with schemathesis against a running portal (gunicorn, real
Slurm): ``schemathesis run --checks all`` with a fixed seed, every phase (examples, coverage,
fuzzing, stateful), as a throwaway account of its own (mapped to the Unix user bob, not an
admin: drains are refused, never performed) so it touches nothing else; revoking tokens is left
out so the run keeps its own token. It fails on any failure: a 500, an answer the document does
not describe, a schema-valid request refused, an invalid one accepted, a method the path does
not serve answered without 405 and ``Allow``.

A few operations refuse schema-valid bodies for reasons a schema cannot say (whether an image,
a node type, a data location or a registry login works on this site); each is listed in
:data:`SITE_CHECKED` with its reason, and its 422 is described in the document."""
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from sqlmodel import Session

import portal.api  # noqa: F401 (registers every view in the route table)
from portal.api.openapi import openapi_document
from portal.services import accounts
from tests.portal.conftest import VENV_BIN

pytestmark = [pytest.mark.portal, pytest.mark.slurm]

SEED = 17
MAX_EXAMPLES = 10
#: (method, path) -> why a schema-valid body may still get 422 there (the document's 422 says so too)
SITE_CHECKED = {
    ("POST", "/jobs"): "the image, node type, GPUs, time limit, project and data locations are this site's",
    ("POST", "/scripts"): "as POST /jobs",
    ("POST", "/services"): "the image and model location must exist and be the caller's to read",
    ("POST", "/services/{name}/update"): "as POST /services",
    ("POST", "/datasources"): "the endpoint and keys are checked against the store",
    ("POST", "/registries"): "the login is checked against the registry",
    ("POST", "/images/build"): "the body must be a tar of a build context; the tag's registry one the caller has",
    ("POST", "/images"): "the image must exist and be the caller's to read",
    ("POST", "/tokens"): "a service named must be one of the caller's",
}
_ACCEPTED = ["2xx", "401", "403", "404", "409", "429", "5xx"]


def _config(path: Path) -> Path:
    lines = []
    for (method, op_path), _why in SITE_CHECKED.items():
        lines += ["[[operations]]", 'include-method = "%s"' % method, 'include-path = "%s"' % op_path,
                  "checks.positive_data_acceptance.expected-statuses = %s" % (_ACCEPTED + ["422"]), ""]
    path.write_text("\n".join(lines).replace("'", '"'))
    return path


def test_api_passes_every_schemathesis_check(live_portal, tmp_path):
    with Session(live_portal.engine, expire_on_commit=False) as db:
        user = accounts.add_user(db, "fuzz-" + uuid.uuid4().hex[:8], "bob", None)
        token, _ = accounts.create_token(db, user, "schemathesis")
        db.commit()
    argv = [str(VENV_BIN / "schemathesis"), "--no-color", "--config-file", str(_config(tmp_path / "st.toml")),
            "run", live_portal.url + "/api/v1/openapi.json", "--checks", "all", "--seed", str(SEED),
            "--max-examples", str(MAX_EXAMPLES), "--generation-database", "none", "--workers", "1",
            "--request-timeout", "30", "--header", "Authorization: Bearer " + token,
            "--exclude-operation-id", "delete_tokens_token_id"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-20000:] + res.stderr[-3000:]


def test_what_only_the_site_can_refuse_is_in_the_422s_description():
    doc = openapi_document()
    for (method, path), _why in SITE_CHECKED.items():
        assert "also refused: " in doc["paths"][path][method.lower()]["responses"]["422"]["description"], (method, path)


def test_document_lists_every_endpoint_of_the_api(app):
    doc = openapi_document()
    documented = {(method.upper(), "/api/v1" + path) for path, ops in doc["paths"].items() for method in ops}
    routes = {(m, r.rule) for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")
              for m in r.methods - {"HEAD", "OPTIONS"}}
    # every route's template, with its converters written as OpenAPI parameters
    as_openapi = {(m, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r)) for m, r in routes}
    # one output file (/outputs/{rel}) is a download, documented with its folder's listing
    assert {x for x in as_openapi - documented if "{rel}" not in x[1]} == set()
