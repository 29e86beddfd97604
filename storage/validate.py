"""Checks the portal runs on a job's data locations before it submits the job.

Both go through the store registry (:mod:`storage.store`): the store of the location's scheme
checks it. :func:`check_location` is pure (syntax, roots, which data source);
:func:`validate_location` adds what needs the world: symlinks on the shared filesystem, and
whether the bucket exists and the data source's keys open it. Every refusal is a
:class:`LocationError` or :class:`AccessDeniedError` whose message says what to fix.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from storage.credentials import DataSource
from storage.store import Location, StoreContext
from storage.store import check_uri, validate_uri


def check_location(text: str, roots: Sequence[str] = (), sources: Mapping[str, DataSource] | None = None
                   ) -> tuple[Location, DataSource | None]:
    """Pure: the parsed location and, for one that needs credentials, the data source that
    serves it. ``roots``: the shared-filesystem directories this account may use (empty: any path)."""
    checked = check_uri(text, StoreContext(tuple(roots), sources or {}))
    return checked.location, checked.sources[0] if checked.sources else None


def validate_location(text: str, roots: Sequence[str] = (), sources: Mapping[str, DataSource] | None = None,
                      must_exist: bool = False, check_store: bool = True, timeout_s: float = 10.0) -> Location:
    """Everything :func:`check_location` checks, then: shared paths do not leave their root
    through symlinks (and exist, with ``must_exist``); for ``s3://`` the bucket exists and the
    keys open it (and, with ``must_exist``, something is under the prefix). One or two requests,
    no retries: the portal is answering a user."""
    ctx = StoreContext(tuple(roots), sources or {}, timeout_s)
    return validate_uri(text, ctx, must_exist=must_exist, check_store=check_store).location
