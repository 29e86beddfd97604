"""A job's outputs: what is in its output folder, and reading one file as the job's user.

The portal runs as root; it never opens a user's file itself. Listing walks the job's own
output folder without following links, and a download streams ``cat`` run as the job's Unix
user, so a symlink a job planted (``output/x -> /etc/shadow``) gets the user's permissions,
not root's.
"""
from __future__ import annotations

import os
import posixpath
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from portal.errors import NotFoundError, ValidationError

MAX_LIST = 2000


@dataclass(frozen=True)
class OutputFile:
    path: str          #: relative to the output folder, POSIX
    size: int


def list_outputs(job_dir: str, limit: int = MAX_LIST) -> list[OutputFile]:
    root = Path(job_dir) / "output"
    out: list[OutputFile] = []
    if not root.is_dir() or root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            if not p.is_symlink():
                out.append(OutputFile(str(p.relative_to(root).as_posix()), st.st_size))
            if len(out) >= limit:
                return out
    return out


def check_rel(rel: str) -> str:
    norm = posixpath.normpath(rel or "")
    if not rel or rel.startswith("/") or norm.startswith("..") or norm == "." or "\0" in rel or "\n" in rel:
        raise ValidationError("path", "a file below the job's output folder, e.g. model/weights.h5")
    return norm


def stream_output(unix_user: str, job_dir: str, rel: str, chunk: int = 1 << 16) -> Iterator[bytes]:
    """The bytes of ``output/REL``, read as ``unix_user``. Raises NotFoundError before the first
    byte when the file cannot be read."""
    path = str(Path(job_dir) / "output" / check_rel(rel))
    argv = ["runuser", "-u", unix_user, "--", "cat", "--", path] if os.geteuid() == 0 else ["cat", "--", path]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(chunk)
    if not first:
        rc = proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stdout.close()
        proc.stderr.close()
        if rc != 0:
            raise NotFoundError("output file %s cannot be read: %s" % (rel, err.split(": ")[-1] or "no such file"))
        return iter([b""])

    def rest() -> Iterator[bytes]:
        try:
            yield first
            while True:
                data = proc.stdout.read(chunk)
                if not data:
                    break
                yield data
        finally:
            proc.stdout.close()
            proc.stderr.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    return rest()
