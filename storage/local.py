"""Staging between shared-filesystem paths and a job's directories.

Incremental: a file whose size and modification time match the destination is skipped, so a
requeued job copies only what is missing. Every file is written to a temporary name and
renamed into place: an interrupted copy never leaves a half-written file under its real name;
the temporary files of writers that died are swept away by the next stage into the directory.
(S3 transfers: :mod:`storage.transfer`.)
"""
from __future__ import annotations

import logging
import os
import hashlib
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from storage.errors import StagingError

log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".aiportal-partial"
STALE_PARTIAL_S = 3600.0


@dataclass
class CopyStats:
    files: int = 0
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    retries: int = 0
    kept_newer: int = 0      #: of ``skipped``: local files newer than the source, left alone

    def summary(self) -> str:
        rate = self.bytes_copied / self.seconds / 1e6 if self.seconds > 0 else 0.0
        text = ("%d files: %d copied (%d bytes, %.1f MB/s), %d already up to date, %.2f s"
                % (self.files, self.copied, self.bytes_copied, rate, self.skipped, self.seconds))
        if self.kept_newer:
            text += ", %d kept because the local copy is newer" % self.kept_newer
        return text + (", %d retries" % self.retries if self.retries else "")


def _host() -> str:
    return socket.gethostname().split(".")[0].replace(".", "-") or "host"


def partial_path(dst: Path) -> Path:
    """A temporary name beside ``dst``, unique per writer (array tasks of one job stage the
    same inputs at the same time): ``.NAME.HOST.PID.RAND.aiportal-partial``. Long names are
    shortened with a hash so the result stays under 255 bytes."""
    name = dst.name
    if len(name.encode("utf-8", "surrogateescape")) > 160:
        name = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return dst.with_name(".%s.%s.%d.%s%s" % (name, _host()[:32], os.getpid(), secrets.token_hex(4), PARTIAL_SUFFIX))


def _writer_gone(name: str, age_s: float) -> bool:
    """Whether the writer of a temporary file is dead: same host and no such process, or the
    file has not changed for an hour (another host, or an old name without a host)."""
    if age_s > STALE_PARTIAL_S:
        return True
    parts = name[: -len(PARTIAL_SUFFIX)].split(".")
    if len(parts) < 4 or parts[-3] != _host()[:32] or not parts[-2].isdigit():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_partials(root: str | Path) -> int:
    """Remove temporary files left below ``root`` by writers that died; returns how many."""
    removed = 0
    now = time.time()
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            if not f.endswith(PARTIAL_SUFFIX):
                continue
            p = os.path.join(dirpath, f)
            try:
                if _writer_gone(f, now - os.lstat(p).st_mtime):
                    os.unlink(p)
                    removed += 1
            except OSError:
                continue
    if removed:
        log.info("removed %d temporary files of interrupted transfers below %s", removed, root)
    return removed


def _same(src: os.stat_result, dst: Path) -> bool:
    try:
        st = dst.stat()
    except FileNotFoundError:
        return False
    return st.st_size == src.st_size and st.st_mtime_ns == src.st_mtime_ns


def _copy_file(src: Path, dst: Path, st: os.stat_result) -> None:
    tmp = partial_path(dst)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 4 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.chmod(tmp, st.st_mode & 0o777)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _walk_error(e: OSError) -> None:
    raise e


def copy_tree(src: str | Path, dst: str | Path, missing_ok: bool = False) -> CopyStats:
    """Copy a file or a directory tree ``src`` into directory ``dst`` (created if needed).

    A directory's contents land in ``dst``; a single file lands as ``dst/NAME``. Symlinks are
    not followed out of the tree: they are skipped with a warning.
    """
    src, dst = Path(src), Path(dst)
    stats = CopyStats()
    t0 = time.monotonic()
    if not src.exists():
        if missing_ok:
            log.info("%s does not exist yet: nothing to restore", src)
            return stats
        raise StagingError(str(src), "does not exist (check the path and that this user can read it)")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        sweep_partials(dst)
        if src.is_file():
            pairs = [(src, dst / src.name)]
        else:
            pairs = []
            for root, dirs, files in os.walk(src, onerror=_walk_error):
                rel = Path(root).relative_to(src)
                for d in dirs:
                    (dst / rel / d).mkdir(parents=True, exist_ok=True)
                pairs += [(Path(root) / f, dst / rel / f) for f in sorted(files)]
        for s, d in pairs:
            if s.is_symlink():
                log.warning("skipping symlink %s", s)
                continue
            if s.name.endswith(PARTIAL_SUFFIX):
                continue
            st = s.stat()
            stats.files += 1
            if _same(st, d):
                stats.skipped += 1
                continue
            _copy_file(s, d, st)
            stats.copied += 1
            stats.bytes_copied += st.st_size
    except OSError as e:
        raise StagingError(str(src), "copy to %s failed: %s" % (dst, e)) from e
    stats.seconds = time.monotonic() - t0
    return stats
