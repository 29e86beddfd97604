"""Planning a transfer (pure, or the filesystem only): which objects land where, which local
files go up under which keys, the directories to create first, and whether a local file is
newer than its object. No request to the store is made here.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from storage.errors import LocationError, StagingError
from storage.local import PARTIAL_SUFFIX
from storage.s3 import ObjectInfo
from storage.uris import DataLocation, key_for_rel_path, rel_path_for_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalFile:
    rel: str          #: relative path with '/' separators
    path: str
    size: int


def plan_download(loc: DataLocation, objects: list[ObjectInfo],
                  dest_dir: Path) -> tuple[list[tuple[ObjectInfo, Path]], list[Path]]:
    """The files to download (object, local path) and the directories to create (from
    ``dir/`` markers), for a listing of ``loc``. Refuses keys that would leave ``dest_dir`` and
    a name that is both a file and a directory."""
    prefix = loc.key
    plan, dirs, files = [], [], set()
    for o in objects:
        rel = rel_path_for_key(prefix, o.key, loc.uri)
        if not rel:
            continue                      # the prefix's own directory marker
        if rel.endswith("/"):
            dirs.append(dest_dir / rel[:-1])
            continue
        plan.append((o, dest_dir / rel))
        files.add(rel)
    for rel in files:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        while parent:
            if parent in files:
                raise LocationError(loc.uri, "%r is both a file and a directory in the bucket; rename one"
                                             % parent)
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
    return plan, dirs


def make_dirs(root: Path, dirs: list[Path]) -> None:
    """Create directories below ``root``, refusing to go through a symlink."""
    root.mkdir(parents=True, exist_ok=True)
    seen: set[Path] = {root}
    for d in dirs:
        chain = []
        p = d
        while p not in seen and p != root:
            chain.append(p)
            p = p.parent
        for p in reversed(chain):
            try:
                os.mkdir(p)
            except FileExistsError:
                if os.path.islink(p) or not p.is_dir():
                    raise LocationError(str(p), "exists and is not a directory (or is a symlink); "
                                                "staging does not write through it") from None
            seen.add(p)


def newer_than(st: os.stat_result, obj: ObjectInfo, slack_s: float = 2.0) -> bool:
    """Whether a local file was modified after the object was stored (clock skew allowed)."""
    return obj.last_modified is not None and st.st_mtime > obj.last_modified.timestamp() + slack_s


def _raise(e: OSError) -> None:
    raise StagingError(e.filename or "?", "cannot read this directory (%s); nothing was staged out" % e.strerror)


def scan_local(src: Path, loc: DataLocation) -> tuple[list[tuple[LocalFile, str]], list[str]]:
    """Files below ``src`` (or ``src`` itself) with their keys, and markers for empty
    directories. Symlinks are skipped with a warning; temporary files are ignored."""
    prefix = loc.key
    if src.is_file():
        st = src.stat()
        return [(LocalFile(src.name, str(src), st.st_size), key_for_rel_path(prefix, src.name, loc.uri))], []
    files, empty = [], []
    for root, dirs, names in os.walk(src, onerror=_raise):
        rel_root = os.path.relpath(root, src)
        rel_root = "" if rel_root == "." else rel_root.replace(os.sep, "/")
        kept_dirs = []
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                log.warning("skipping symlink %s", os.path.join(root, d))
            else:
                kept_dirs.append(d)
        dirs[:] = sorted(kept_dirs)
        count = len(kept_dirs)
        for name in sorted(names):
            p = os.path.join(root, name)
            if name.endswith(PARTIAL_SUFFIX):
                continue
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                log.warning("skipping %s %s", "symlink" if stat.S_ISLNK(st.st_mode) else "special file", p)
                continue
            rel = "%s/%s" % (rel_root, name) if rel_root else name
            files.append((LocalFile(rel, p, st.st_size), key_for_rel_path(prefix, rel, loc.uri)))
            count += 1
        if count == 0 and rel_root:
            empty.append(key_for_rel_path(prefix, rel_root + "/", loc.uri))
    return files, empty

