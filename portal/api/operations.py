"""The API's blueprint and its route table: :func:`operation` declares a view (its Flask route
and its OpenAPI entry); the helpers every view shares (body, answer, query arguments, owners)."""
from __future__ import annotations

import functools
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

import pydantic
from flask import Blueprint, jsonify, request

from portal import scopes
from portal.auth import api_auth
from portal.db_session import db
from portal.errors import ValidationError
from portal.services import accounts
from portal.models.common import parse

bp = Blueprint("api", __name__)

M = TypeVar("M", bound=pydantic.BaseModel)
#: an answer's schema: a model, a raw JSON schema, or None (no body)
Answer = type[pydantic.BaseModel] | Mapping[str, Any] | None


@dataclass(frozen=True)
class Operation:
    """One API operation, as the OpenAPI document describes it."""

    method: str
    rule: str                                   #: Flask rule below /api/v1, e.g. /jobs/<job_id>
    summary: str
    answers: Mapping[int, Answer]               #: success status -> body
    errors: tuple[int, ...] = ()
    body: type[pydantic.BaseModel] | None = None
    body_required: bool = True
    #: query parameters and their JSON schemas; anything else is refused
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: optional request headers the operation reads: name -> {"description", "schema"}
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: other media types of the success answer (e.g. text/plain for a log)
    media: tuple[str, ...] = ("application/json",)
    #: the schema of one Server-Sent Event, where ``media`` has text/event-stream
    events: Mapping[str, Any] | None = None
    #: path parameters' JSON schemas, where more than a string or an integer (e.g. a pattern)
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: query parameters that must be given
    required_query: tuple[str, ...] = ()
    #: a body other than a JSON object: media type -> its schema (e.g. a tar)
    raw_body: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: why a body the document allows may still be refused with 422: what only this site can say
    #: (an image that does not exist, a node type it does not have), for the 422's description
    refuses: str = ""
    auth: bool = True

    @property
    def path(self) -> str:
        """The rule as an OpenAPI path: ``/jobs/<job_id>`` -> ``/jobs/{job_id}``."""
        return re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", self.rule)


#: every operation of the API, in the order they were declared
OPERATIONS: list[Operation] = []
_BY_RULE: dict[tuple[str, str], Operation] = {}


def operation(method: str, rule: str, summary: str, answers: Mapping[int, Answer], errors: tuple[int, ...] = (),
              **kw: Any) -> Callable[[Callable], Callable]:
    """Declare a view: its route on :data:`bp` and its entry in the OpenAPI document. Every
    operation may answer 422 (an unknown query parameter or body field)."""
    op = Operation(method=method.upper(), rule=rule, summary=summary, answers=answers,
                   errors=tuple(sorted(set(errors) | {422} | ({401, 403, 429} if kw.get("auth", True) else set()))), **kw)

    def register(view: Callable) -> Callable:
        OPERATIONS.append(op)
        _BY_RULE[(op.method, "/api/v1" + rule)] = op
        checked = _known_body_fields(op, view)
        bp.add_url_rule(rule, view.__name__, api_auth(checked, scopes.needed(op.method, rule)) if op.auth else checked,
                        methods=[op.method])
        return view
    return register


def _known_body_fields(op: Operation, view: Callable) -> Callable:
    """The view, refusing a JSON body's unknown fields first (422 naming them), for every
    operation: one that takes no body takes no fields. The one place unknown fields are
    refused, whatever the body model says (its document has ``additionalProperties: false``)."""
    known = frozenset() if op.body is None else frozenset(
        f.alias or name for name, f in op.body.model_fields.items())

    @functools.wraps(view)
    def checked(*args, **kwargs):
        data = _json_body()         # None for other bodies (a build's tar is left unread)
        unknown = set(data) - known if isinstance(data, dict) else set()
        if unknown:
            raise ValidationError("body", "unknown fields %s; this endpoint takes %s"
                                  % (", ".join(sorted(unknown)), ", ".join(sorted(known)) or "no body"))
        return view(*args, **kwargs)
    return checked


@bp.before_request
def _known_query_parameters():
    """Unknown query parameters are refused (a typo like ?limt=5 is not silently ignored)."""
    if request.url_rule is None or not request.args:
        return None
    op = _BY_RULE.get((request.method if request.method != "HEAD" else "GET", request.url_rule.rule))
    if op is None:
        return None
    unknown = set(request.args) - set(op.query)
    if unknown:
        raise ValidationError("query", "unknown parameters %s; this endpoint takes %s"
                              % (", ".join(sorted(unknown)), ", ".join(sorted(op.query)) or "none"))
    return None


def _json_body() -> Any:
    """The request's JSON body; None when it is not JSON."""
    if not request.is_json:
        return None
    try:
        return json.loads(request.get_data())
    except ValueError:
        return None


def _whole_numbers(model: type[pydantic.BaseModel], data: dict) -> dict:
    """``data`` with a number that has no fractional part (``30.0``) given for a whole-number
    field as that whole number: JSON Schema's ``integer``, which the document says, takes it."""
    def whole(name: str) -> bool:
        f = model.model_fields.get(name)
        types = typing.get_args(f.annotation) or (f.annotation,) if f is not None else ()
        return int in types and float not in types
    return {k: int(v) if isinstance(v, float) and v.is_integer() and whole(k) else v for k, v in data.items()}


def body(model: type[M], required: bool = True) -> M:
    """The request's JSON body as ``model`` (ValidationError names every invalid field)."""
    data = {} if not required and not request.data else _json_body()
    if not isinstance(data, dict):
        raise ValidationError("body", "send a JSON object with Content-Type: application/json")
    return parse(model, _whole_numbers(model, data))


def answer(model: pydantic.BaseModel, status: int = 200, headers: Mapping[str, str] | None = None):
    """A public model as the JSON answer."""
    resp = jsonify(model.model_dump(mode="json"))
    resp.status_code = status
    if headers:
        resp.headers.update(headers)
    return resp


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name, "must be a whole number") from None
    if not lo <= value <= hi:
        raise ValidationError(name, "must be between %d and %d" % (lo, hi))
    return value


def bool_arg(name: str) -> bool:
    """A yes/no query parameter: true/false, 1/0 or yes/no; anything else is refused naming it."""
    raw = request.args.get(name)
    if raw is None:
        return False
    value = _BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise ValidationError(name, "must be true or false (or 1 or 0), not %r" % raw[:40])
    return value


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
#: a yes/no query parameter's schema (what :func:`bool_arg` reads)
BOOLEAN = {"type": "boolean", "description": "true or false (1 or 0, yes or no are read too)"}


def owners(rows) -> dict[int, str]:
    """The account names of the rows' owners, in one query."""
    return accounts.owner_names(db(), rows)
