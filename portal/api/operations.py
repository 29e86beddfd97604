"""The API's blueprint and its route table: :func:`operation` declares a view (its Flask route
and its OpenAPI entry); the helpers every view shares (body, answer, query arguments, owners)."""
from __future__ import annotations

import re
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
    """Declare a view: its route on :data:`bp` and its entry in the OpenAPI document."""
    op = Operation(method=method.upper(), rule=rule, summary=summary, answers=answers,
                   errors=tuple(sorted(set(errors) | ({401, 403, 429} if kw.get("auth", True) else set()))), **kw)

    def register(view: Callable) -> Callable:
        OPERATIONS.append(op)
        _BY_RULE[(op.method, "/api/v1" + rule)] = op
        bp.add_url_rule(rule, view.__name__, api_auth(view, scopes.needed(op.method, rule)) if op.auth else view,
                        methods=[op.method])
        return view
    return register


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


def body(model: type[M], required: bool = True) -> M:
    """The request's JSON body as ``model`` (ValidationError names every invalid field)."""
    data = {} if not required and not request.data else request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ValidationError("body", "send a JSON object with Content-Type: application/json")
    return parse(model, data)


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


def owners(rows) -> dict[int, str]:
    """The account names of the rows' owners, in one query."""
    return accounts.owner_names(db(), rows)
