"""The shared filesystem as a store: ``/abs/path`` or ``file:///abs/path``.

Locations must lie under the account's roots (:attr:`storage.store.StoreContext.roots`), also
once symlinks are resolved; staging copies with :func:`storage.local.copy_tree`. No data-source
credentials are involved.
"""
from __future__ import annotations

import os
import posixpath
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from storage.errors import AccessDeniedError, LocationError
from storage.local import PARTIAL_SUFFIX, CopyStats, copy_tree
from storage.store import SHARED_SCHEME, Checked, Entry, Listing, StageRequest, Store, StoreContext
from storage.uris import DataLocation, Scheme, check_shared_path, parse_location


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_symlinks(path: str, roots: Sequence[str], uri: str) -> None:
    """The path as the filesystem resolves it (its longest existing part) must stay under the
    same roots: a symlink anywhere on the way may not lead out of them. The refusal names neither
    the part that exists nor where it resolves to: the portal resolves as root, and both would
    tell what is in someone else's folder behind the symlink."""
    existing = path
    while existing != "/" and not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    real = os.path.realpath(existing)
    real_roots = [os.path.realpath(r) for r in roots]
    if roots and not any(_inside(real, r) for r in real_roots):
        raise LocationError(uri, "goes through a symlink that leads out of the data roots; give the real path "
                                 "inside %s" % ", ".join(roots))


class SharedStore(Store[DataLocation]):
    scheme = SHARED_SCHEME
    form = "an absolute path on the shared filesystem"
    bindable = True         # every node sees it: a job binds it read-only rather than copy it

    def parse(self, text: str) -> DataLocation:
        loc = parse_location(text)
        if loc.scheme is not Scheme.SHARED:
            raise LocationError(text, "not a shared-filesystem path; give an absolute path")
        return loc

    def check(self, loc: DataLocation, ctx: StoreContext) -> Checked[DataLocation]:
        path = check_shared_path(loc.path, ctx.roots, loc.original)
        return Checked(DataLocation(Scheme.SHARED, path, loc.original))

    def validate(self, checked: Checked[DataLocation], ctx: StoreContext, must_exist: bool,
                 check_store: bool) -> None:
        # the local filesystem is always checked: cheap, and a symlink out of the roots is a hole
        loc = checked.location
        check_symlinks(loc.path, ctx.roots, loc.original)
        if must_exist and not os.path.exists(loc.path):
            raise LocationError(loc.original, "does not exist (check the path and that your account can read it)")

    def stage_in(self, loc: DataLocation, dest_dir: Path, missing_ok: bool, req: StageRequest) -> CopyStats:
        return copy_tree(loc.path, dest_dir, missing_ok=missing_ok)

    def stage_out(self, src: Path, loc: DataLocation, req: StageRequest) -> CopyStats:
        return copy_tree(src, loc.path)

    def browse(self, loc: DataLocation, ctx: StoreContext, source: str | None, page_size: int,
               token: str | None) -> Listing:
        if source is not None:
            raise LocationError(loc.original, "shared-filesystem paths are not browsed through a data source "
                                              "(%r); browse the path without one" % source)
        checked = self.check(loc, ctx)
        self.validate(checked, ctx, must_exist=True, check_store=False)
        path = checked.location.path
        try:
            start = int(token) if token else 0
        except ValueError:
            raise LocationError(loc.original, "page token %r is not one this listing gave; start again "
                                              "without it" % token) from None
        try:
            with os.scandir(path) as it:
                found = sorted(((e.is_dir(follow_symlinks=False), e) for e in it
                                if not e.name.endswith(PARTIAL_SUFFIX)),
                               key=lambda p: (not p[0], p[1].name))
        except NotADirectoryError:
            raise LocationError(loc.original, "is a file; browse the folder it is in") from None
        except PermissionError:
            raise AccessDeniedError(loc.original, "this account cannot list this folder") from None
        entries = []
        for is_dir, e in found[start:start + page_size]:
            if is_dir:
                entries.append(Entry(e.name, posixpath.join(path, e.name), True))
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue                                 # removed while we listed
            if e.is_file(follow_symlinks=False):
                entries.append(Entry(e.name, posixpath.join(path, e.name), False, st.st_size,
                                     datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        nxt = start + page_size
        return Listing(entries, str(nxt) if nxt < len(found) else None)

    def parent(self, loc: DataLocation) -> str | None:
        path = loc.path.rstrip("/") or "/"
        return None if path == "/" else posixpath.dirname(path)

