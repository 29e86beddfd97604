"""`aiportal stage in|out`: run inside a job on the compute node, as the job's user.

The store of the location's scheme does the copying (:func:`storage.store.store_for`):
shared-filesystem locations with :func:`storage.local.copy_tree`, ``s3://`` ones with the
transfer engine (:mod:`storage.transfer`) and the job's credentials file.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from storage.errors import StageOutPendingError, StorageError
from storage.local import CopyStats
from storage.store import Credentials, StageRequest, store_for

if TYPE_CHECKING:       # boto3 is imported only when an s3:// location is staged
    from storage.transfer import TransferOptions

log = logging.getLogger(__name__)
PENDING_PREFIX = "STAGE_OUT_PENDING."


def stage_in(source: str, dest_dir: str, missing_ok: bool = False, *, credentials: Credentials = None,
             options: TransferOptions | None = None, workers: int | None = None,
             bandwidth_mbps: float | None = None, progress_every: float | None = None,
             emit: Callable[[str], object] | None = None) -> CopyStats:
    """Copy ``source`` (a directory, or one file) into ``dest_dir``; files already there and
    identical are skipped. ``missing_ok``: a source that does not exist yet is not an error
    (restoring the outputs of a job's first run)."""
    store = store_for(source)
    loc = store.parse(source)
    req = StageRequest(credentials, options, workers, bandwidth_mbps, progress_every, emit)
    return store.stage_in(loc, Path(dest_dir), missing_ok, req)


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
    store = store_for(dest)
    loc = store.parse(dest)
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
        stats = store.stage_out(src, loc, StageRequest(credentials, options, workers, bandwidth_mbps,
                                                       progress_every, emit))
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
