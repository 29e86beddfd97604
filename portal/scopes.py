"""What an API token may do (pure): its scopes, and the scope each API operation needs.

A token made without scopes has the account's full access (every token made before scopes
existed is one). A scoped token may do only what its scopes name, and a token bound to one
service may call only that service (``/service/NAME``). An **invoke key** is a token with the one
scope ``services:invoke`` bound to one service: what an application that calls a model needs,
and nothing else (it cannot submit jobs as the owner, read their data, or manage services).

The scope an operation needs comes from one table, by the first part of its path and its method
(:func:`needed`); an operation the table does not know needs full access, so a new endpoint is
closed to scoped tokens until it is given a scope here. Managing tokens and sessions always
needs full access: a scoped token cannot make itself a wider one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from portal.errors import ValidationError

#: every scope, with what it allows (shown by the CLI and the API document)
SCOPES: dict[str, str] = {
    "jobs:read": "list and read jobs, their logs, progress and outputs; images, registries, the cluster",
    "jobs:write": "submit, cancel and resubmit jobs; register and build images; registries",
    "services:invoke": "call inference services at /service/NAME",
    "services:manage": "list, deploy, scale, update and delete inference services",
    "data:read": "list data sources and browse them",
    "data:write": "register and delete data sources",
    "admin": "drain and resume nodes (an admin account's token only)",
}

#: path prefix (after /api/v1) -> (scope for GET/HEAD, scope for the other methods)
_TABLE: dict[str, tuple[str, str]] = {
    "jobs": ("jobs:read", "jobs:write"),
    "scripts": ("jobs:read", "jobs:read"),     # renders a script, stores nothing
    "images": ("jobs:read", "jobs:write"),
    "registries": ("jobs:read", "jobs:write"),
    "cluster": ("jobs:read", "admin"),
    "services": ("services:manage", "services:manage"),
    "datasources": ("data:read", "data:write"),
    "me": ("", ""),                             # any valid token: who am I
}


def needed(method: str, rule: str) -> str | None:
    """The scope an API operation (``rule`` as registered, e.g. ``/jobs/<job_id>``) needs:
    "" for any valid token, None for full access only (tokens, sessions, anything not in the
    table)."""
    first = rule.strip("/").split("/", 1)[0]
    pair = _TABLE.get(first)
    if pair is None:
        return None
    return pair[0] if method.upper() in ("GET", "HEAD") else pair[1]


def parse(scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes as given (``--scope``, the API's ``scopes``), checked, sorted, without repeats."""
    out = set()
    for s in scopes:
        if s not in SCOPES:
            raise ValidationError("scopes", "unknown scope %r; the scopes are %s" % (s, ", ".join(SCOPES)))
        out.add(s)
    if not out:
        raise ValidationError("scopes", "name at least one scope (%s), or leave scopes out for a token with the "
                              "account's full access" % ", ".join(SCOPES))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Grant:
    """What the caller's credentials allow: ``scopes`` None is full access (a session, the
    bootstrap admin token, a token made without scopes); ``service_id`` binds it to one service."""

    scopes: tuple[str, ...] | None = None
    service_id: str | None = None

    @property
    def full(self) -> bool:
        return self.scopes is None and self.service_id is None

    def allows(self, scope: str | None) -> bool:
        """Whether an operation needing ``scope`` (:func:`needed`) is allowed."""
        if scope is None:
            return self.full
        if self.service_id is not None:
            return scope in ("", "services:invoke")     # an invoke key: its one service, nothing else
        return scope == "" or self.scopes is None or scope in self.scopes

    def may_call(self, service_id: str) -> bool:
        """Whether ``/service/NAME`` of the service ``service_id`` may be called (its owner's
        or an admin's token is checked apart)."""
        return self.allows("services:invoke") and (self.service_id is None or self.service_id == service_id)

    @classmethod
    def of(cls, scopes: str, service_id: str | None) -> "Grant":
        """From a token's record: its space-separated scopes ("" = full access) and service."""
        return cls(tuple(scopes.split()) if scopes.strip() else None, service_id or None)


FULL = Grant()
