"""The OpenAPI 3.1 document of /api/v1, generated (served at /api/v1/openapi.json, no token).

Nothing here is written by hand but the envelope: the paths come from the route table
(:data:`portal.api.OPERATIONS`, filled by each view's :func:`portal.api.operation`), the schemas
from the create and public models through pydantic's own JSON Schema generator. Pydantic is
already what validates every request body, so the document and the validation cannot disagree,
and no second schema library is needed (spectree, flask-openapi3 and apispec would each bring
their own route decorators or marshmallow schemas beside the models).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import pydantic
from pydantic.json_schema import models_json_schema

from portal import __version__, scopes
from portal.api.operations import OPERATIONS

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {400: "bad request", 401: "no or bad token", 403: "not allowed", 404: "not found (or not yours)",
               409: "conflict", 422: "invalid fields", 429: "too many requests", 502: "storage failed",
               503: "Slurm, the store or the log host is unreachable"}
ERROR = {"type": "object", "required": ["error", "message"], "properties": {
    "error": {"type": "string"}, "message": {"type": "string"},
    "errors": {"type": "object", "additionalProperties": {"type": "string"},
               "description": "invalid fields and their messages"}}}


def _is_model(x: Any) -> bool:
    return isinstance(x, type) and issubclass(x, pydantic.BaseModel)


@functools.lru_cache(maxsize=None)
def openapi_document() -> dict[str, Any]:
    if not OPERATIONS:
        raise RuntimeError("no API operations are registered: import portal.api (it registers every view) "
                           "before asking for the document")
    inputs = {op.body for op in OPERATIONS if op.body is not None}
    outputs = {a for op in OPERATIONS for a in op.answers.values() if _is_model(a)}
    keyed = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)] + \
            [(m, "serialization") for m in sorted(outputs, key=lambda m: m.__name__)]
    refs, defs = models_json_schema(keyed, ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR
    for model in inputs:        # unknown body fields are refused for every operation (operations._known_body_fields)
        schemas[refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]]["additionalProperties"] = False

    def schema_of(answer, mode: str) -> Mapping[str, Any]:
        return refs[(answer, mode)] if _is_model(answer) else answer

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        responses: dict[str, Any] = {}
        for status, answer in op.answers.items():
            if answer is None:
                responses[str(status)] = {"description": "no content"}
            else:
                schema = schema_of(answer, "serialization")
                responses[str(status)] = {"description": "OK", "content": {
                    m: {"schema": op.events if m == "text/event-stream" and op.events else schema} for m in op.media}}
        for status in op.errors:
            text = _ERROR_TEXT[status] + ("; also refused: " + op.refuses if status == 422 and op.refuses else "")
            responses[str(status)] = {"description": text, "content": {
                "application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
        entry: dict[str, Any] = {"summary": op.summary, "operationId": "%s_%s" % (
            op.method.lower(), op.path.strip("/").replace("/", "_").replace("{", "").replace("}", "").replace(".", "_")),
            "responses": responses}
        params = [{"name": name, "in": "path", "required": True,
                   "schema": dict(op.params.get(name) or (
                       {"type": "integer"} if "<int:%s>" % name in op.rule else {"type": "string"}))}
                  for name in _path_names(op.path)]
        params += [{"name": name, "in": "query", "required": name in op.required_query, "schema": dict(schema)}
                   for name, schema in op.query.items()]
        params += [{"name": name, "in": "header", "required": False, "description": h["description"],
                    "schema": dict(h["schema"])} for name, h in op.headers.items()]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": op.body_required, "content": {
                "application/json": {"schema": schema_of(op.body, "validation")}}}
        if op.raw_body:
            entry["requestBody"] = {"required": True, "content": {m: {"schema": dict(schema)}
                                                                  for m, schema in op.raw_body.items()}}
        if not op.auth:
            entry["security"] = []
        else:
            # what a scoped token needs for it (portal/scopes.py); a session has full access
            need = scopes.needed(op.method, op.rule)
            entry["security"] = [{"bearer": [need] if need else []}]
            entry["x-aiportal-scope"] = need if need is not None else "full access"
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "aiportal", "version": __version__,
                 "description": "Slurm-backed AI training and inference portal. Authenticate with "
                                "'Authorization: Bearer TOKEN'."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": (
            "an API token; a token made with scopes may call only the operations whose scope it has "
            "(x-aiportal-scope): %s" % "; ".join("%s: %s" % kv for kv in scopes.SCOPES.items()))}},
            "schemas": schemas},
    }


def _path_names(path: str) -> list[str]:
    out, rest = [], path
    while "{" in rest:
        rest = rest[rest.index("{") + 1:]
        out.append(rest[:rest.index("}")])
    return out
