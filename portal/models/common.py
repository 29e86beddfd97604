"""What every create and public model shares: parsing a request body into a create model with
every problem reported by field (:func:`parse`), and timestamps written as ISO 8601."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Mapping, TypeVar

import pydantic
from pydantic import PlainSerializer, WithJsonSchema

from portal.errors import ValidationError

M = TypeVar("M", bound=pydantic.BaseModel)

#: a time in an answer: ISO 8601 with its offset (``2026-12-06T05:17:32.123456+00:00``)
Timestamp = Annotated[dt.datetime, PlainSerializer(lambda t: t.isoformat(), return_type=str),
                      WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization")]
#: the same, or null where it has not happened (yet)
OptionalTimestamp = Annotated[dt.datetime | None,
                              PlainSerializer(lambda t: t.isoformat() if t is not None else None,
                                              return_type=str | None),
                              WithJsonSchema({"type": ["string", "null"], "format": "date-time"}, mode="serialization")]

# what pydantic's error types mean to someone filling in a form
_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "greater_than_equal": "is too small",
    "less_than_equal": "is too large",
}


def parse(model: type[M], body: Any) -> M:
    """``body`` (a JSON object, a form's fields) as ``model``, or a ValidationError that names
    every invalid field: unknown fields under ``body``, a missing one with the model's
    ``missing_messages`` (how to fill it in), a value error with its own message."""
    if not isinstance(body, Mapping):
        raise ValidationError("body", "send a JSON object with Content-Type: application/json")
    try:
        return model.model_validate(dict(body))
    except pydantic.ValidationError as e:
        raise as_validation_error(model, e) from None


def as_validation_error(model: type[pydantic.BaseModel], e: pydantic.ValidationError) -> ValidationError:
    missing: Mapping[str, str] = getattr(model, "missing_messages", {})
    errors: dict[str, str] = {}
    unknown: list[str] = []
    for err in e.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "extra_forbidden":
            unknown.append(field)
            continue
        if field in errors:
            continue
        if err["type"] == "missing":
            errors[field] = missing.get(field, "is required")
        elif err["type"] == "value_error":
            errors[field] = str(err["ctx"]["error"]) if err.get("ctx") else err["msg"]
        else:
            limit = (err.get("ctx") or {}).get("ge", (err.get("ctx") or {}).get("le"))
            message = _TYPE_MESSAGES.get(err["type"], err["msg"])
            errors[field] = message + (" (limit %s)" % limit if limit is not None else "")
    if unknown:
        errors = {"body": "unknown fields %s" % ", ".join(sorted(unknown)), **errors}
    return ValidationError.of(errors or {"body": str(e)})
