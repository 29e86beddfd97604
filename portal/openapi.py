"""The OpenAPI 3.1 document of /api/v1 (served at /api/v1/openapi.json, fuzzed by the tests)."""
from __future__ import annotations

import functools
from typing import Any

from portal import __version__

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_INT = {"type": "integer"}
_NINT = {"type": ["integer", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}

ERROR = {"type": "object", "required": ["error", "message"], "properties": {
    "error": _STR, "message": _STR,
    "errors": {"type": "object", "additionalProperties": _STR, "description": "invalid fields and their messages"}}}

JOB_INPUT = {"type": "object", "required": ["image", "node_type", "command"], "additionalProperties": False,
             "properties": {
    "image": {"type": "string", "description": "a .sif path, docker-archive:/PATH.tar or oci-archive:/PATH.tar",
              "examples": ["/srv/aiportal/shared/images/base/debian-python.sif"]},
    "node_type": {"type": "string", "description": "1card or 4card (see GET /cluster)", "examples": ["1card"]},
    "command": {"description": "the command run in the image: a list of arguments, or one string split "
                               "like a shell would (no shell runs it)",
                "oneOf": [{"type": "array", "items": _STR, "minItems": 1}, _STR]},
    "name": _STR,
    "inputs": {"type": "array", "items": _STR, "description": "s3://bucket/prefix or shared paths, staged into /data/data"},
    "output": _NSTR,
    "env": {"type": "object", "additionalProperties": _STR},
    "time_limit": {"type": "string", "examples": ["01:00:00"]},
    "gpus": _NINT,
    "sweep": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": ["string", "number"]}},
              "description": "a parameter grid: one array task per combination, each as environment variables"},
    "project": _NSTR,
}}

EVENT = {"type": "object", "required": ["at", "kind", "message"], "properties": {
    "at": _TIME, "kind": _STR, "state": _NSTR, "node": _NSTR, "message": _STR}}

JOB = {"type": "object", "required": ["id", "name", "state", "created_at"], "properties": {
    "id": _STR, "name": _STR, "owner": _NSTR, "state": _STR, "slurm_job_id": _NSTR, "external": {"type": "boolean"},
    "node_type": _STR, "partition": _STR, "gpus": _INT, "image": _STR, "request": {"type": "object"},
    "reason": _STR, "nodes": _STR, "exit_code": _NINT, "restarts": _INT, "created_at": _TIME,
    "submitted_at": _TIME, "started_at": _TIME, "ended_at": _TIME,
    "stage_out_pending": {"type": ["array", "null"]},
    "script": _STR, "events": {"type": "array", "items": EVENT}}}

IMAGE = {"type": "object", "required": ["id", "ref", "state"], "properties": {
    "id": _INT, "ref": _STR, "digest": _STR, "sif": _STR,
    "state": {"type": "string", "enum": ["PENDING", "CONVERTING", "READY", "FAILED"]},
    "conversion_job_id": _NSTR, "message": _STR, "created_at": _TIME, "updated_at": _TIME}}

DATASOURCE = {"type": "object", "required": ["name", "endpoint"], "properties": {
    "name": _STR, "endpoint": _STR, "region": _STR, "buckets": {"type": "array", "items": _STR},
    "bandwidth_mbps": {"type": ["number", "null"]}, "workers": _NINT,
    "access_key": {"type": "string", "description": "masked"}, "created_at": _TIME}}

DATASOURCE_INPUT = {"type": "object", "required": ["name", "endpoint", "access_key", "secret_key"], "properties": {
    "name": _STR, "endpoint": _STR, "region": _STR, "access_key": _STR, "secret_key": _STR,
    "buckets": {"type": "array", "items": _STR}, "bandwidth_mbps": {"type": ["number", "null"]},
    "workers": _NINT, "check": {"type": "boolean", "description": "check that the keys open each bucket (default true)"}}}

_POLICY = {
    "min_replicas": {"type": "integer", "minimum": 0, "maximum": 64},
    "max_replicas": {"type": "integer", "minimum": 1, "maximum": 64},
    "target_inflight": {"type": "number", "description": "requests in flight per replica the autoscaler aims at"},
    "scale_down_delay_s": {"type": "number", "description": "seconds of low load before a replica is removed"},
}
_SPEC = {
    "image": {"type": "string", "description": "a .sif path on the shared filesystem"},
    "model": {"type": "string", "description": "the model folder: s3://SOURCE/bucket/prefix or a shared path, "
                                               "staged into /data/data"},
    "model_file": {"type": "string", "description": "the .py file with the model class, in the model folder "
                                                    "(default model.py)"},
    "class_name": {"type": "string", "description": "the class: load_model(self), execute(self, data, batch_size)"},
    "version": _STR, "gpus": _INT, "cpus": _INT, "memory_mb": _INT, "max_batch_size": _INT,
    "max_wait_ms": {"type": "number"}, "max_body_bytes": _INT,
}
SERVICE_INPUT = {"type": "object", "required": ["name", "image", "model"], "additionalProperties": False,
                 "properties": {"name": {"type": "string", "description": "lower-case letters, digits, '-': "
                                                                          "the URL /service/NAME"},
                                "replicas": {"type": "integer", "description": "a fixed count (min = max)"},
                                **_SPEC, **_POLICY}}
SERVICE_UPDATE = {"type": "object", "additionalProperties": False, "properties": {
    **_SPEC, "weight": {"type": "integer", "minimum": 0, "maximum": 100,
                        "description": "gray release: with spec fields (1-99), the new version runs beside the "
                                       "current one for this share of the requests; alone, changes that share "
                                       "(100 rolls the new version out, 0 stops it)"}},
                  "description": "the fields to change; the rest stay as they are"}
SERVICE_SCALE = {"type": "object", "additionalProperties": False,
                 "properties": {"replicas": {"type": "integer"}, **_POLICY}}
REPLICA = {"type": "object", "required": ["id", "phase"], "properties": {
    "id": _STR, "phase": {"type": "string", "enum": ["PENDING", "STARTING", "READY", "UNHEALTHY", "DRAINING", "ENDED"]},
    "version": _STR, "generation": _INT, "slurm_job_id": _NSTR, "host": _NSTR, "port": _NINT,
    "avg_inflight": {"type": ["number", "null"]}, "message": _STR, "created_at": _TIME, "ready_at": _TIME,
    "ended_at": _TIME}}
SERVICE = {"type": "object", "required": ["id", "name", "state", "url"], "properties": {
    "id": _STR, "name": _STR, "owner": _NSTR, "state": {"type": "string", "enum": ["RUNNING", "UPDATING", "DELETING"]},
    "url": _STR, "spec": {"type": "object"}, "next_spec": {"type": ["object", "null"]}, "next_weight": _NINT, "generation": _INT,
    "version": _NSTR, "min_replicas": _INT, "max_replicas": _INT, "desired_replicas": _INT,
    "target_inflight": {"type": "number"}, "scale_down_delay_s": {"type": "number"}, "message": _STR,
    "ready_replicas": _INT, "replicas": {"type": "array", "items": REPLICA}, "created_at": _TIME, "updated_at": _TIME}}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "bad request", 401: "no or bad token", 403: "not allowed", 404: "not found (or not yours)",
            409: "conflict", 422: "invalid fields", 429: "too many requests", 502: "storage failed",
            503: "Slurm, the store or the log host is unreachable"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, text[c]) for c in codes}


def _op(summary: str, responses: dict, body: dict | None = None, params: list | None = None,
        body_required: bool = True) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema or _STR}


def _query(name: str, schema: dict, description: str = "") -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def rule_as_path(rule: str) -> str:
    """A Flask rule below /api/v1 as an OpenAPI path: ``/jobs/<job_id>`` -> ``/jobs/{job_id}``."""
    import re
    return re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule[len("/api/v1"):] if rule.startswith("/api/v1") else rule)


@functools.lru_cache(maxsize=None)
def query_parameters(method: str, rule: str) -> frozenset[str] | None:
    """The query parameters the document gives an operation (None: the operation is not in it)."""
    op = openapi_document()["paths"].get(rule_as_path(rule), {}).get(method.lower())
    if op is None:
        return None
    return frozenset(p["name"] for p in op.get("parameters", []) if p["in"] == "query")


def openapi_document() -> dict:
    ref = lambda name: {"$ref": "#/components/schemas/%s" % name}  # noqa: E731
    job_id = _path_param("job_id")
    std = (400, 401, 503)
    paths = {
        "/openapi.json": {"get": _op("this document", {"200": _json({"type": "object"}), **_errors(401)})},
        "/me": {"get": _op("the caller's account", {"200": _json({"type": "object"}), **_errors(401)})},
        "/jobs": {
            "get": _op("jobs the caller may see, newest first", {
                "200": _json({"type": "object", "required": ["jobs", "total"], "properties": {
                    "jobs": {"type": "array", "items": ref("Job")}, "total": _INT, "limit": _INT, "offset": _INT}}),
                **_errors(401, 422)}, params=[
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 500}),
                _query("offset", {"type": "integer", "minimum": 0}),
                _query("state", _STR, "only jobs in this state (repeatable)")]),
            "post": _op("submit a training job", {"201": _json(ref("Job"), "submitted"),
                                                   **_errors(*std, 403, 404, 409, 422, 502)}, ref("JobInput"))},
        "/scripts": {"post": _op("the exact batch script a submission renders to (nothing is submitted)", {
            "200": _json({"type": "object", "required": ["script"], "properties": {"script": _STR}}),
            **_errors(400, 401, 422)}, ref("JobInput"))},
        "/jobs/{job_id}": {"get": _op("one job with its script and timeline", {
            "200": _json(ref("Job")), **_errors(401, 404)}, params=[job_id])},
        "/jobs/{job_id}/cancel": {"post": _op("cancel a job", {
            "202": _json(ref("Job"), "cancel requested"), **_errors(401, 404, 409, 503)}, params=[job_id])},
        "/jobs/{job_id}/resubmit": {"post": _op("submit a new job with the same request", {
            "201": _json(ref("Job")), **_errors(*std, 403, 404, 409, 422, 502)}, params=[job_id])},
        "/jobs/{job_id}/log": {"get": _op("the job's log (plain text from ?offset; ?follow=1: Server-Sent Events)", {
            "200": {"description": "log text", "content": {"text/plain": {"schema": _STR},
                                                           "text/event-stream": {"schema": _STR}}},
            **_errors(401, 404, 422, 503)}, params=[
            job_id, _query("offset", {"type": "integer", "minimum": 0}),
            _query("follow", {"type": "string", "enum": ["0", "1"]}), _query("task", _STR, "array task")])},
        "/jobs/{job_id}/progress": {"get": _op("loss and examples/sec parsed from the log", {
            "200": _json({"type": "object", "properties": {"points": {"type": "array", "items": {"type": "object"}}}}),
            **_errors(401, 404, 503)}, params=[job_id])},
        "/jobs/{job_id}/outputs": {"get": _op("files in the job's output folder", {
            "200": _json({"type": "object", "properties": {"output": _NSTR, "files": {"type": "array", "items": {
                "type": "object", "properties": {"path": _STR, "size": _INT, "url": _STR}}}}}),
            **_errors(401, 404)}, params=[job_id])},
        "/cluster": {"get": _op("partitions, nodes, GPUs, queue, node events", {
            "200": _json({"type": "object"}), **_errors(401, 503)})},
        "/cluster/nodes/{node}/drain": {"post": _op("drain a node (admins)", {
            "202": _json({"type": "object"}), **_errors(*std, 403, 422)},
            {"type": "object", "required": ["reason"], "properties": {"reason": _STR}}, [_path_param("node")])},
        "/cluster/nodes/{node}/resume": {"post": _op("resume a node (admins)", {
            "202": _json({"type": "object"}), **_errors(401, 403, 422, 503)}, params=[_path_param("node")])},
        "/images": {
            "get": _op("the caller's images (admins: all)", {
                "200": _json({"type": "object", "properties": {"images": {"type": "array", "items": ref("Image")}}}),
                **_errors(401, 503)}),
            "post": _op("register an image (archives are converted by a Slurm job)", {
                "201": _json(ref("Image")), **_errors(*std, 422)},
                {"type": "object", "required": ["ref"], "properties": {"ref": _STR}})},
        "/images/cache": {"get": _op("the shared SIF cache", {"200": _json({"type": "object"}), **_errors(401)})},
        "/datasources": {
            "get": _op("the caller's data sources (keys masked)", {
                "200": _json({"type": "object", "properties": {"datasources": {"type": "array",
                                                                                "items": ref("DataSource")}}}),
                **_errors(401)}),
            "post": _op("register a data source (keys sealed at rest)", {
                "201": _json(ref("DataSource")), **_errors(400, 401, 403, 409, 422, 503)}, ref("DataSourceInput"))},
        "/datasources/{name}": {"delete": _op("delete a data source", {
            "204": {"description": "deleted"}, **_errors(401, 404)}, params=[_path_param("name")])},
        "/datasources/{name}/browse": {"get": _op("one level of a prefix", {
            "200": _json({"type": "object"}), **_errors(400, 401, 403, 404, 422, 503)},
            params=[_path_param("name"), _query("prefix", _STR, "s3://bucket/prefix"),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}), _query("token", _STR)])},
        "/tokens": {
            "get": _op("the caller's API tokens (never the tokens themselves)", {
                "200": _json({"type": "object"}), **_errors(401)}),
            "post": _op("create an API token (shown once)", {
                "201": _json({"type": "object", "required": ["token"], "properties": {"token": _STR, "id": _INT}}),
                **_errors(400, 401, 422)},
                {"type": "object", "properties": {"name": _STR, "expires_days": {"type": ["integer", "null"],
                                                                                  "minimum": 1, "maximum": 3650}}},
                body_required=False)},
        "/services": {
            "get": _op("the caller's inference services (admins: all)", {
                "200": _json({"type": "object", "properties": {"services": {"type": "array",
                                                                             "items": ref("Service")}}}),
                **_errors(401)}),
            "post": _op("deploy a service: replicas on the infer partition behind POST|PUT /service/NAME", {
                "201": _json(ref("Service")), **_errors(400, 401, 403, 409, 422, 503)}, ref("ServiceInput"))},
        "/services/{name}": {
            "get": _op("a service and its replicas", {"200": _json(ref("Service")), **_errors(401, 404)},
                       params=[_path_param("name")]),
            "delete": _op("delete a service (its replicas are stopped)", {
                "202": _json(ref("Service")), **_errors(401, 404)}, params=[_path_param("name")])},
        "/services/{name}/scale": {"post": _op("set the replica count or the autoscaling range", {
            "200": _json(ref("Service")), **_errors(400, 401, 404, 409, 422)}, SERVICE_SCALE,
            [_path_param("name")])},
        "/services/{name}/update": {"post": _op("a new version: rolling update (one replica at a time), or gray "
                                                  "release with a weight", {
            "202": _json(ref("Service")), **_errors(400, 401, 403, 404, 409, 422, 503)}, SERVICE_UPDATE,
            [_path_param("name")])},
        "/tokens/{token_id}": {"delete": _op("revoke a token", {"204": {"description": "revoked"}, **_errors(401, 404)},
                                             params=[_path_param("token_id", _INT)])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "aiportal", "version": __version__,
                 "description": "Slurm-backed AI training and inference portal. Authenticate with "
                                "'Authorization: Bearer TOKEN'."},
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR, "Job": JOB, "JobInput": JOB_INPUT, "Event": EVENT, "Image": IMAGE,
                        "DataSource": DATASOURCE, "DataSourceInput": DATASOURCE_INPUT, "Service": SERVICE,
                        "ServiceInput": SERVICE_INPUT, "Replica": REPLICA},
        },
    }
