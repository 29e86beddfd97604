"""Checks the portal runs on a job's data locations before it submits the job.

:func:`check_location` is pure (syntax, roots, which data source); :func:`validate_location`
adds what needs the world: symlinks on the shared filesystem, and whether the bucket exists and
the data source's keys open it. Every refusal is a :class:`LocationError` or
:class:`AccessDeniedError` whose message says what to fix.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from storage.credentials import DataSource, resolve_source
from storage.errors import LocationError
from storage.s3 import S3Store, translate
from storage.uris import DataLocation, Scheme, check_shared_path, parse_location


def check_location(text: str, roots: Sequence[str] = (), sources: Mapping[str, DataSource] | None = None
                   ) -> tuple[DataLocation, DataSource | None]:
    """Pure: the parsed location and, for ``s3://``, the data source that serves it.
    ``roots``: the shared-filesystem directories this account may use (empty: any path)."""
    loc = parse_location(text)
    if loc.scheme is Scheme.SHARED:
        path = check_shared_path(loc.path, tuple(roots), text)
        return DataLocation(Scheme.SHARED, path, text), None
    return loc, resolve_source(sources or {}, loc)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_symlinks(path: str, roots: Sequence[str], uri: str) -> None:
    """The path as the filesystem resolves it (its longest existing part) must stay under the
    same roots: a symlink anywhere on the way may not lead out of them."""
    existing = path
    while existing != "/" and not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    real = os.path.realpath(existing)
    real_roots = [os.path.realpath(r) for r in roots]
    if roots and not any(_inside(real, r) for r in real_roots):
        raise LocationError(uri, "goes through a symlink that leads out of the data roots (%s resolves to %s); "
                                 "give the real path inside %s" % (existing, real, ", ".join(roots)))


def validate_location(text: str, roots: Sequence[str] = (), sources: Mapping[str, DataSource] | None = None,
                      must_exist: bool = False, check_store: bool = True, timeout_s: float = 10.0) -> DataLocation:
    """Everything :func:`check_location` checks, then: shared paths do not leave their root
    through symlinks (and exist, with ``must_exist``); for ``s3://`` the bucket exists and the
    keys open it (and, with ``must_exist``, something is under the prefix). One or two requests,
    no retries: the portal is answering a user."""
    loc, source = check_location(text, roots, sources)
    if loc.scheme is Scheme.SHARED:
        check_symlinks(loc.path, roots, text)
        if must_exist and not os.path.exists(loc.path):
            raise LocationError(text, "does not exist (check the path and that your account can read it)")
        return loc
    if not check_store:
        return loc
    with S3Store(source, workers=1, connect_timeout=timeout_s, read_timeout=timeout_s) as store:
        try:
            prefixes, objects, _ = store.list_dir(loc.bucket, loc.key + "/" if loc.key else "", max_keys=1)
            if must_exist and not prefixes and not objects and not (loc.key and store.head(loc.bucket, loc.key)):
                raise LocationError(text, "no objects under this prefix in bucket %r (check the prefix)" % loc.bucket)
        except LocationError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, text, source) from e
    return loc
