"""Staging between shared-filesystem paths and a job's directories.

Incremental: a file whose size and modification time match the destination is skipped, so a
requeued job copies only what is missing. Every file is written to a temporary name and
renamed into place: an interrupted copy never leaves a half-written file under its real name.
(S3 sources and destinations, checksums, parallelism and bandwidth caps belong to the data
access layer and build on this.)
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from storage.errors import StagingError

log = logging.getLogger(__name__)


@dataclass
class CopyStats:
    files: int = 0
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.bytes_copied / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return ("%d files: %d copied (%d bytes, %.1f MB/s), %d already up to date, %.2f s"
                % (self.files, self.copied, self.bytes_copied, rate, self.skipped, self.seconds))


def _same(src: os.stat_result, dst: Path) -> bool:
    try:
        st = dst.stat()
    except FileNotFoundError:
        return False
    return st.st_size == src.st_size and st.st_mtime_ns == src.st_mtime_ns


def _copy_file(src: Path, dst: Path, st: os.stat_result) -> None:
    # unique per writer: array tasks of one job stage the same inputs at the same time
    tmp = dst.with_name(".%s.%d.%s.aiportal-partial" % (dst.name, os.getpid(), secrets.token_hex(4)))
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
        if src.is_file():
            pairs = [(src, dst / src.name)]
        else:
            pairs = []
            for root, dirs, files in os.walk(src):
                rel = Path(root).relative_to(src)
                for d in dirs:
                    (dst / rel / d).mkdir(parents=True, exist_ok=True)
                pairs += [(Path(root) / f, dst / rel / f) for f in sorted(files)]
        for s, d in pairs:
            if s.is_symlink():
                log.warning("skipping symlink %s", s)
                continue
            if s.name.endswith(".aiportal-partial"):
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
