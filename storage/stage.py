"""`aiportal stage in|out`: run inside a job on the compute node, as the job's user.

Shared-filesystem locations are copied by :func:`storage.local.copy_tree`; ``s3://`` ones by
the transfer engine (:mod:`storage.transfer`) with the job's credentials file.

Stage-out never loses outputs: before it starts it writes ``STAGE_OUT_PENDING.NAME.json``
beside the directory it stages (``$JOB_DIR/STAGE_OUT_PENDING.output.json`` for a job's
``output/``) with the destination and the command that finishes the work; it removes the record
only when everything is at the destination. If the store stays down (or the process is killed)
the outputs are still in the job directory, the record says why, and running the same
``aiportal stage out`` later completes it, sending only what is missing.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import shlex
import socket
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from storage.credentials import DataSource, load_credentials, resolve_source
from storage.errors import StageOutPendingError, StorageError
from storage.local import CopyStats, copy_tree, sweep_partials
from storage.uris import DataLocation, Scheme, parse_location

if TYPE_CHECKING:       # boto3 is imported only when an s3:// location is staged
    from storage.transfer import Transfer, TransferOptions

log = logging.getLogger(__name__)
PENDING_PREFIX = "STAGE_OUT_PENDING."

#: A credentials file (its path), sources already loaded, or None (no s3:// locations).
Credentials = str | os.PathLike | Mapping[str, DataSource] | None


def _options(source: DataSource, options: TransferOptions | None, workers: int | None,
             bandwidth_mbps: float | None, progress_every: float | None) -> TransferOptions:
    """``options``, then the data source's settings, then the explicit arguments. A bandwidth
    cap can only be lowered: the tightest of the source's (the site protects its storage) and
    the caller's applies."""
    from storage.transfer import TransferOptions
    opt = options or TransferOptions()
    workers = workers or source.workers or opt.workers
    caps = [c for c in (opt.bandwidth_mbps, source.bandwidth_mbps, bandwidth_mbps) if c]
    return replace(opt, workers=workers, bandwidth_mbps=min(caps) if caps else None,
                   progress_every=opt.progress_every if progress_every is None else progress_every)


def _run_s3(loc: DataLocation, credentials, options, workers, bandwidth_mbps, progress_every, label: str,
            emit: Callable[[str], object] | None, body: Callable[[Transfer], CopyStats]) -> CopyStats:
    from storage.s3 import S3Store
    from storage.transfer import Transfer
    source = resolve_source(load_credentials(credentials), loc)
    opt = _options(source, options, workers, bandwidth_mbps, progress_every)
    with S3Store(source, workers=opt.workers) as store:
        t = Transfer(store, opt, label, emit)
        return body(t)


def stage_in(source: str, dest_dir: str, missing_ok: bool = False, *, credentials: Credentials = None,
             options: TransferOptions | None = None, workers: int | None = None,
             bandwidth_mbps: float | None = None, progress_every: float | None = None,
             emit: Callable[[str], object] | None = None) -> CopyStats:
    """Copy ``source`` (a directory, or one file) into ``dest_dir``; files already there and
    identical are skipped. ``missing_ok``: a source that does not exist yet is not an error
    (restoring the outputs of a job's first run)."""
    loc = parse_location(source)
    if loc.scheme is Scheme.SHARED:
        return copy_tree(loc.path, dest_dir, missing_ok=missing_ok)
    dest = Path(dest_dir)
    if dest.is_dir():
        sweep_partials(dest)
    return _run_s3(loc, credentials, options, workers, bandwidth_mbps, progress_every, "stage in %s" % loc.uri, emit,
                   lambda t: t.download(loc, dest, missing_ok=missing_ok))


def pending_record_path(source_dir: str | os.PathLike) -> Path:
    src = Path(os.path.abspath(source_dir))
    return src.parent / ("%s%s.json" % (PENDING_PREFIX, src.name))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_record(path: Path, record: Mapping[str, Any]) -> bool:
    tmp = path.with_name(".%s.%s.tmp" % (path.name, secrets.token_hex(4)))
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(record, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write the stage-out record %s: %s", path, e.strerror)
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def stage_out(source_dir: str, dest: str, *, credentials: Credentials = None,
              options: TransferOptions | None = None, workers: int | None = None,
              bandwidth_mbps: float | None = None, progress_every: float | None = None,
              pending_record: str | os.PathLike | None = None, emit: Callable[[str], object] | None = None) -> CopyStats:
    """Copy ``source_dir`` to ``dest``; files already there and identical are skipped.

    A failure raises :class:`StageOutPendingError` (a :class:`StagingError`) naming where the
    outputs are, the record describing the pending stage-out and the command that finishes it.
    """
    loc = parse_location(dest)
    src = Path(os.path.abspath(source_dir))
    record_path = Path(pending_record) if pending_record else pending_record_path(src)
    retry = ["aiportal", "stage", "out", "--from", str(src), "--to", dest]
    if credentials is not None and not isinstance(credentials, Mapping):
        retry += ["--credentials", os.path.abspath(credentials)]
    record: dict[str, Any] = {
        "state": "in_progress", "source": str(src), "destination": dest, "started": _now(),
        "host": socket.gethostname(), "pid": os.getpid(),
        "reason": "stage-out started and has not finished; if this record stays, it was interrupted",
        "retry": retry,
    }
    recorded = _write_record(record_path, record)
    try:
        if loc.scheme is Scheme.SHARED:
            stats = copy_tree(src, loc.path)
        else:
            stats = _run_s3(loc, credentials, options, workers, bandwidth_mbps, progress_every,
                            "stage out %s" % loc.uri, emit,
                            lambda t: t.upload(src, loc))
    except StorageError as e:
        record.update(state="failed", failed=_now(), code=e.code, reason=str(e))
        recorded = _write_record(record_path, record)
        where = ("recorded in %s" % record_path) if recorded else "no record could be written"
        why = e.reason if getattr(e, "uri", None) == dest else str(e)
        raise StageOutPendingError(dest, "%s. The outputs are safe in %s (%s); finish later with: %s"
                                   % (why, src, where, shlex.join(retry)),
                                   str(src), str(record_path) if recorded else None) from e
    if recorded:
        try:
            record_path.unlink()
        except FileNotFoundError:
            pass
    return stats


def pending_stage_outs(job_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The pending stage-out records of a job (its outputs are still only in the job
    directory): for the portal's job view."""
    out = []
    job_dir = Path(job_dir)
    for d in (job_dir, job_dir / "output"):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if name.startswith(PENDING_PREFIX) and name.endswith(".json"):
                try:
                    rec = json.loads((d / name).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(rec, dict):
                    rec["record"] = str(d / name)
                    out.append(rec)
    return out
