"""Finishing a pending stage-out from the portal, and keeping a job's credentials file no longer
than it is needed.

A job whose stage-out could not finish (the store was down, :mod:`storage.stage`) ends with its
outputs still in its folder, one ``STAGE_OUT_PENDING.*.json`` record per output folder, its
credentials file (``.aiportal-credentials.json``: the user's data-source keys) and
``Job.stage_out_pending`` set (:class:`portal.models.stage_out.PendingStageOut`).

* :func:`request_finish` (the job page's "Finish stage-out", ``POST /api/v1/jobs/ID/stage-out``,
  ``aiportal stage finish JOB``): one attempt at a time per job (an event keyed
  ``stage-out:open:JOB`` claims it), a fresh credentials file from the owner's data sources if the
  job's is gone, then a small Slurm job *as the job's user* on the job's partition that runs
  ``aiportal stage out --from SRC --to DEST ...`` for every pending record, appending to
  ``JOB_DIR/logs/stage-out.out``.
* :func:`check_finishes` (every reconciler cycle): finishing jobs that ended. Nothing pending any
  more: ``stage_out_pending`` is cleared and the credentials file removed; else the attempt is
  marked failed with the reason the records give. Cheap: one lookup of the open attempts'
  events (an index), one Slurm call only while some run, one folder read per attempt that ended.
* :func:`sweep_credentials` (hourly, :class:`StageOuts`): a job whose stage-out was finished
  outside the portal (by the command its log printed) is cleared; a credentials file is removed
  ``job_credentials_keep_days`` after the job ended, pending stage-out or not (finishing it later
  writes a fresh one); ended jobs are each looked at once, from a cursor on their end time.

The timeline gets ``stage_out`` events: requested (by whom, which Slurm job), finished, failed
(with the reason), credentials removed.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from sqlalchemy import and_, or_
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from portal.errors import ConflictError, PortalError
from portal.models import Event, EventKind, Job, User, utcnow
from portal.models.stage_out import FinishState, PendingStageOut, StageOutFinish
from portal.services import datasources
from portal.services.conversions import ended_words
from portal.services.job_data import check_job_data
from portal.settings import Settings
from slurm.errors import SlurmError
from slurm.jobs import JobStatus
from slurm.render import COMMENT_PREFIX, render_command_job
from storage.credentials import JOB_CREDENTIALS_NAME, SecretBox, remove_job_credentials, write_job_credentials
from storage.errors import StorageError
from storage.stage import pending_stage_outs
from storage.store import needs_credentials

log = logging.getLogger(__name__)

#: the key of the event that claims a job's open attempt (released when the attempt ends)
OPEN_KEY = "stage-out:open:"
#: an index range of the events' unique key that holds every claim whatever the database's
#: collation (a linguistic one may ignore the punctuation: the bounds differ at a letter)
_OPEN_RANGE = ("stage-out:open", "stage-out:opeo")
#: the finishing job's comment (no job id in it: a portal job is bound to the uuid in its own comment)
COMMENT = COMMENT_PREFIX + "stage-out"
#: its log, every attempt appended (Slurm opens it as the job's user, in the job's logs/)
LOG_NAME = "logs/stage-out.out"
#: how often the credentials sweep runs, and how far back the first sweep of a process looks
SWEEP_EVERY_S = 3600.0
SWEEP_LOOKBACK = dt.timedelta(days=30)
#: ended jobs looked at per sweep step (a longer backlog goes on at the next cycle)
SWEEP_BATCH = 500
MAX_REASON = 600
_TASK_DIR = re.compile(r"^task-\d+$")


@dataclass(frozen=True)
class PendingRecord:
    """The fields of a ``STAGE_OUT_PENDING`` record the portal uses."""

    source: str
    destination: str
    state: str = ""
    reason: str = ""
    started: str = ""

    @classmethod
    def of(cls, rec: Mapping[str, Any]) -> "PendingRecord":
        return cls(str(rec.get("source") or ""), str(rec.get("destination") or ""), str(rec.get("state") or ""),
                   str(rec.get("reason") or ""), str(rec.get("started") or ""))


# -- pure parts --------------------------------------------------------------------------------------

def open_key(job_id: str) -> str:
    return OPEN_KEY + job_id


def log_path(job_dir: str) -> str:
    return "%s/%s" % (job_dir.rstrip("/"), LOG_NAME)


def check_records(job_dir: str, output: str | None, records: Sequence[PendingRecord]) -> list[PendingRecord]:
    """Each record stages one of this job's output folders to this job's output: ``output/`` to
    OUTPUT, an array task's ``output/task-N`` to OUTPUT/task-N (what the batch script does).
    The records live in the user's folder: anything else is refused, not run. Returns them
    with their folders written plainly (what the finishing job is given)."""
    out_dir = PurePosixPath(os.path.normpath(job_dir)) / "output"
    if not output:
        raise ConflictError("job has no output location, so it has no stage-out to finish")
    checked = []
    for rec in records:
        src = PurePosixPath(os.path.normpath(rec.source or "/"))
        if src == out_dir:
            want = output
        elif src.parent == out_dir and _TASK_DIR.match(src.name):
            want = output.rstrip("/") + "/" + src.name
        else:
            raise ConflictError("the pending stage-out record for %s does not stage this job's output folder; "
                                "finish it by hand with the command in the record" % (rec.source or "?"))
        if rec.destination != want:
            raise ConflictError("the pending stage-out record for %s sends it to %s, not to the job's output %s; "
                                "finish it by hand with the command in the record" % (rec.source, rec.destination, want))
        checked.append(replace(rec, source=str(src)))
    return checked


def finish_argv(stage_bin: str, records: Sequence[PendingRecord], credentials: str | None) -> list[str]:
    """``aiportal stage out`` for every record (one process, each pair in turn)."""
    argv = [stage_bin, "stage", "out"]
    for rec in records:
        argv += ["--from", rec.source, "--to", rec.destination]
    if credentials:
        argv += ["--credentials", credentials]
    return argv


def failure_reason(records: Sequence[PendingRecord], finish: StageOutFinish, status: JobStatus | None) -> str:
    """Why an attempt left something pending: the error a record of this attempt gives, else how
    its Slurm job ended (it may never have reached ``stage out``)."""
    started = finish.requested_at.isoformat(timespec="seconds")
    for rec in records:
        if rec.state == "failed" and rec.reason and rec.started >= started:
            return _cut(rec.reason)
    how = ended_words(status) if status is not None else "and Slurm no longer knows it"
    return _cut("the finishing job %s ended %s before the stage-out finished; its log: %s"
                % (finish.slurm_job_id or "?", how or "?", LOG_NAME))


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3].rstrip() + "..."


def keep_expired(settings: Settings, job: Job, now: dt.datetime) -> bool:
    """The job ended more than ``job_credentials_keep_days`` ago (0: never)."""
    keep = settings.job_credentials_keep_days
    return bool(keep > 0 and job.ended_at is not None and _aware(job.ended_at) <= now - dt.timedelta(days=keep))


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def _destinations(records: Sequence[PendingRecord]) -> str:
    return ", ".join(sorted({r.destination for r in records})) or "?"


def read_pending(job_dir: str) -> list[dict[str, Any]] | None:
    """The job's pending stage-out records, read from its folder now; None when the folder is
    gone (nothing is left to stage out). Raises OSError when the folder cannot be read (a
    filesystem hiccup is never taken for "nothing pending")."""
    try:
        os.listdir(job_dir)
    except FileNotFoundError:
        return None
    return pending_stage_outs(job_dir)


# -- asking for it ---------------------------------------------------------------------------------

def request_finish(db: Session, settings: Settings, backend, box: SecretBox, user: User, job: Job) -> Job:
    """Submit the job that finishes ``job``'s pending stage-out, as the job's Unix user.

    ConflictError (409) when nothing is pending (the records are read again from the job's folder:
    a stage-out finished by hand clears the job here), when the job has not ended, or while an
    attempt runs. A refused submission marks the attempt failed and raises."""
    if job.external or not job.job_dir:
        raise ConflictError("job %s was not submitted by the portal: it has no stage-out the portal can finish" % job.id)
    if not job.state.terminal:
        raise ConflictError("job %s has not ended (%s); it stages out itself when it ends" % (job.id, job.state.value))
    doc = PendingStageOut.load(job.stage_out_pending)
    if doc is not None and doc.finish is not None and doc.finish.open:
        raise ConflictError("the stage-out of job %s is being finished already (Slurm job %s, %s); wait for it"
                            % (job.id, doc.finish.slurm_job_id or "being submitted", doc.finish.state.value))
    now = utcnow()
    try:
        records = read_pending(job.job_dir)      # the folder, not the row, says what is pending
    except OSError as e:
        raise PortalError("cannot read the folder of job %s (%s): %s; try again" % (job.id, job.job_dir, e)) from e
    if not records:
        if doc is not None:
            _finished(db, job, now, [PendingRecord.of(r) for r in doc.records], outside=True, gone=records is None)
            db.commit()
        raise ConflictError("job %s has no pending stage-out%s" % (job.id, "" if doc is None else (
            ": its folder is gone" if records is None else " any more: it was finished outside the portal")))
    pending = check_records(job.job_dir, job.request.get("output"), [PendingRecord.of(r) for r in records])
    owner = db.get(User, job.user_id)
    event = Event(at=now, kind=EventKind.STAGE_OUT, job_id=job.id, user_id=job.user_id, key=open_key(job.id),
                  message="finish stage-out requested by %s" % user.name)
    attempt = StageOutFinish(state=FinishState.SUBMITTING, requested_at=now, requested_by=user.name)
    job.stage_out_pending = PendingStageOut(records=tuple(records), finish=attempt).dump()
    job.updated_at = now
    db.add(event)
    db.add(job)
    try:
        db.commit()         # the claim: a second request fails on the event's unique key
    except IntegrityError:
        db.rollback()
        raise ConflictError("the stage-out of job %s is being finished already; wait for it" % job.id) from None
    try:
        fresh, creds = _credentials(db, settings, box, owner, job, pending)
        script = render_command_job(
            name="stage-out-%s" % job.id[:8],
            partition=settings.stage_finish_partition or job.partition or next(iter(settings.node_types.values())).partition,
            argv=finish_argv(settings.stage_bin, pending, creds), log_path=log_path(job.job_dir), cpus=1,
            time_limit=settings.stage_finish_time_limit, comment=COMMENT)
        slurm_id = backend.submit(script, user=owner.unix_user)
    except (SlurmError, StorageError, PortalError, OSError) as e:
        _attempt_over(db, settings, job, event, now, "the finishing job was not submitted: %s" % e)
        db.commit()
        raise
    doc = PendingStageOut(records=tuple(records), finish=attempt.model_copy(
        update={"state": FinishState.RUNNING, "slurm_job_id": slurm_id}))
    job.stage_out_pending = doc.dump()
    event.message = ("finish stage-out requested by %s: Slurm job %s runs `aiportal stage out` as %s%s (log: %s)"
                     % (user.name, slurm_id, owner.unix_user,
                        ", with a fresh credentials file from the data sources" if fresh else "", LOG_NAME))[:2000]
    db.add(job)
    db.add(event)
    db.commit()
    log.info("job %s: finishing its stage-out in Slurm job %s as %s (asked by %s)", job.id, slurm_id,
             owner.unix_user, user.name)
    return job


def _credentials(db: Session, settings: Settings, box: SecretBox, owner: User, job: Job,
                 records: Sequence[PendingRecord]) -> tuple[bool, str | None]:
    """(whether it was written now, the credentials file the finishing job passes to ``stage
    out``), or (False, None) when no destination needs keys. The job's own file if it is still
    there; else a fresh one with the owner's data sources that serve the job's output."""
    if not any(needs_credentials(r.destination) for r in records):
        return False, None
    path = Path(job.job_dir) / JOB_CREDENTIALS_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return False, str(path)
    if st is not None:          # something else under its name (a symlink?): the stage command would refuse it
        os.unlink(path)
    needed = check_job_data(settings, owner.unix_user, [], job.request.get("output"),
                            datasources.sources_of(db, box, owner), check_store=False)
    write_job_credentials(job.job_dir, needed.values(), user=owner.unix_user, name=JOB_CREDENTIALS_NAME)
    return True, str(path)


# -- noticing how it ended -------------------------------------------------------------------------

def open_claims(db: Session) -> list[Event]:
    """The events that claim an open attempt: one range of the events' unique key index."""
    rows = db.exec(select(Event).where(Event.key >= _OPEN_RANGE[0], Event.key < _OPEN_RANGE[1]))
    return [e for e in rows if e.key and e.key.startswith(OPEN_KEY)]


def _attempt_open(db: Session, job_id: str) -> bool:
    return db.exec(select(Event.id).where(Event.key == open_key(job_id))).first() is not None


def _event(db: Session, job: Job, now: dt.datetime, message: str) -> None:
    db.add(Event(at=now, kind=EventKind.STAGE_OUT, job_id=job.id, user_id=job.user_id, message=message[:2000]))


def _finished(db: Session, job: Job, now: dt.datetime, records: Sequence[PendingRecord], outside: bool = False,
              gone: bool = False) -> None:
    """Nothing is pending any more: clear the job, remove its credentials file (the caller commits).
    ``gone``: the job's folder is gone, outputs and all."""
    job.stage_out_pending = None
    job.updated_at = now
    db.add(job)
    if gone:
        _event(db, job, now, "the job's folder is gone: nothing is left to stage out (the outputs that were pending "
                             "for %s were not staged out by the portal)" % _destinations(records))
        log.info("job %s: its folder %s is gone; its pending stage-out is dropped", job.id, job.job_dir)
        return
    removed = remove_job_credentials(job.job_dir)
    _event(db, job, now, "stage-out finished%s: the outputs are at %s%s" % (
        " outside the portal" if outside else "", _destinations(records),
        "; the credentials file was removed" if removed else ""))
    log.info("job %s: stage-out finished%s", job.id, " outside the portal" if outside else "")


def _attempt_over(db: Session, settings: Settings, job: Job, claim: Event | None, now: dt.datetime, reason: str,
                  status: JobStatus | None = None) -> None:
    """End the open attempt of ``job``: cleared when nothing is pending, else failed with
    ``reason`` (or what the records say); the claim released (the caller commits)."""
    if claim is not None:
        claim.key = None
        db.add(claim)
    doc = PendingStageOut.load(job.stage_out_pending) or PendingStageOut()
    try:
        records = read_pending(job.job_dir)
    except OSError as e:        # never taken for "nothing pending": keep what is known
        log.warning("job %s: cannot read its folder %s: %s", job.id, job.job_dir, e)
        records = list(doc.records)
    if not records:
        _finished(db, job, now, [PendingRecord.of(r) for r in doc.records], gone=records is None)
        return
    finish = doc.finish or StageOutFinish(state=FinishState.FAILED, requested_at=now, requested_by="?")
    if not reason:
        reason = failure_reason([PendingRecord.of(r) for r in records], finish, status)
    finish = finish.model_copy(update={"state": FinishState.FAILED, "ended_at": now, "reason": reason})
    job.stage_out_pending = PendingStageOut(records=tuple(records), finish=finish).dump()
    job.updated_at = now
    removed = keep_expired(settings, job, now) and remove_job_credentials(job.job_dir)
    db.add(job)
    _event(db, job, now, "finish stage-out failed: %s. The outputs are still in %s/output; try again%s" % (
        reason.rstrip("."), job.job_dir, " (the credentials file was removed: the job ended over %g days ago; "
        "the next attempt writes a fresh one)" % settings.job_credentials_keep_days if removed else ""))
    log.info("job %s: finishing its stage-out failed: %s", job.id, reason)


def check_finishes(db: Session, settings: Settings, backend, now: dt.datetime | None = None) -> int:
    """The reconciler's check: the open attempts (events keyed ``stage-out:open:``, an index
    range) whose Slurm job ended get their outcome; one ``statuses`` call for all that run.
    Returns how many attempts ended."""
    now = now or utcnow()
    claims = open_claims(db)
    if not claims:
        return 0
    jobs: dict[str, tuple[Event, Job, StageOutFinish | None]] = {}
    for claim in claims:
        job = db.get(Job, claim.job_id) if claim.job_id else None
        if job is None:
            claim.key = None
            db.add(claim)
            continue
        doc = PendingStageOut.load(job.stage_out_pending)
        jobs[job.id] = (claim, job, doc.finish if doc is not None else None)
    running = sorted({f.slurm_job_id for _, _, f in jobs.values()
                      if f is not None and f.state is FinishState.RUNNING and f.slurm_job_id})
    statuses = backend.statuses(running) if running else {}
    grace = dt.timedelta(seconds=settings.submit_grace_s)
    ended = 0
    for claim, job, finish in jobs.values():
        if finish is None or not finish.open:
            _attempt_over(db, settings, job, claim, now, "the attempt's record was lost")
        elif finish.state is FinishState.SUBMITTING or not finish.slurm_job_id:
            if now - _aware(claim.at) < grace:
                continue
            _attempt_over(db, settings, job, claim, now, "the portal stopped before it submitted the finishing job")
        else:
            status = statuses.get(finish.slurm_job_id)
            if status is None and now - _aware(finish.requested_at) < grace:
                continue        # not in squeue's answer yet
            if status is not None and not status.state.terminal:
                continue
            _attempt_over(db, settings, job, claim, now, "", status)
        db.commit()
        ended += 1
    db.commit()
    return ended


# -- the sweep ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cursor:
    """Where the sweep of ended jobs has got to: their end time, then their id."""

    ended_at: dt.datetime
    job_id: str = ""


@dataclass(frozen=True)
class Sweep:
    cleared: int        #: pending stage-outs found finished outside the portal
    removed: int        #: credentials files removed
    cursor: Cursor      #: where the next sweep goes on
    more: bool          #: a full batch: go on at once


def sweep_credentials(db: Session, settings: Settings, now: dt.datetime, after: Cursor,
                      batch: int = SWEEP_BATCH) -> Sweep:
    """Jobs with a pending stage-out and no open attempt: cleared when their records are gone,
    their credentials file removed once ``job_credentials_keep_days`` have passed since they
    ended. Then the ended jobs after ``after`` (by end time) that ended at least that long ago:
    their credentials file removed (at most ``batch`` of them)."""
    cleared = removed = 0
    open_ids = {c.job_id for c in open_claims(db)}
    for job in db.exec(select(Job).where(Job.stage_out_pending.is_not(None))).all():
        if job.id in open_ids or not job.job_dir:
            continue
        try:
            records = read_pending(job.job_dir)
        except OSError as e:
            log.warning("job %s: cannot read its folder %s: %s", job.id, job.job_dir, e)
            continue
        if not records:
            doc = PendingStageOut.load(job.stage_out_pending)
            _finished(db, job, now, [PendingRecord.of(r) for r in (doc.records if doc else ())], outside=True,
                      gone=records is None)
            cleared += 1
        elif keep_expired(settings, job, now) and not _attempt_open(db, job.id) and remove_job_credentials(job.job_dir):
            _event(db, job, now, "the credentials file was removed %g days after the job ended; the stage-out is "
                                 "still pending (finishing it writes a fresh one from your data sources)"
                   % settings.job_credentials_keep_days)
            removed += 1
        db.commit()
    keep = settings.job_credentials_keep_days
    if keep <= 0:
        return Sweep(cleared, removed, after, False)
    until = now - dt.timedelta(days=keep)
    rows = list(db.exec(select(Job).where(
        Job.ended_at.is_not(None), Job.ended_at <= until, Job.external == False, Job.job_dir != "",  # noqa: E712
        Job.stage_out_pending.is_(None),
        or_(Job.ended_at > after.ended_at, and_(Job.ended_at == after.ended_at, Job.id > after.job_id)))
        .order_by(Job.ended_at, Job.id).limit(batch)))
    for job in rows:
        if _attempt_open(db, job.id):        # asked for since the sweep began: its attempt needs the file
            continue
        try:
            gone = remove_job_credentials(job.job_dir)
        except OSError as e:
            log.warning("job %s: cannot remove its credentials file: %s", job.id, e)
            continue
        if gone:
            _event(db, job, now, "the credentials file was removed %g days after the job ended" % keep)
            removed += 1
    db.commit()
    more = len(rows) == batch
    cursor = Cursor(_aware(rows[-1].ended_at), rows[-1].id) if more else Cursor(until)
    return Sweep(cleared, removed, cursor, more)


class StageOuts:
    """The reconciler's stage-out step (one call per cycle): :func:`check_finishes` every cycle,
    :func:`sweep_credentials` every ``sweep_every_s`` (at once again while a backlog remains).
    The sweep's cursor lives here: a new process looks back ``SWEEP_LOOKBACK`` beyond the keep time."""

    def __init__(self, engine, backend, settings: Settings, sweep_every_s: float = SWEEP_EVERY_S):
        self.engine, self.backend, self.settings, self.sweep_every_s = engine, backend, settings, sweep_every_s
        self.cursor: Cursor | None = None
        self.next_sweep = 0.0

    def cycle(self, now: dt.datetime | None = None) -> int:
        """Returns how many attempts ended; a failure (Slurm, the database, the filesystem) is
        logged and tried again next cycle."""
        now = now or utcnow()
        ended = 0
        with Session(self.engine, expire_on_commit=False) as db:
            try:
                ended = check_finishes(db, self.settings, self.backend, now)
            except (SlurmError, SQLAlchemyError, OSError) as e:
                db.rollback()
                log.warning("checking the finishing stage-outs failed (trying again next cycle): %s", e)
            if time.monotonic() < self.next_sweep:
                return ended
            start = self.cursor or Cursor(now - dt.timedelta(days=self.settings.job_credentials_keep_days)
                                          - SWEEP_LOOKBACK)
            try:
                sweep = sweep_credentials(db, self.settings, now, start)
            except (SQLAlchemyError, OSError) as e:
                db.rollback()
                log.warning("the credentials sweep failed (trying again in %.0f s): %s", self.sweep_every_s, e)
                self.next_sweep = time.monotonic() + self.sweep_every_s
                return ended
            self.cursor = sweep.cursor
            self.next_sweep = time.monotonic() + (0 if sweep.more else self.sweep_every_s)
            if sweep.cleared or sweep.removed:
                log.info("credentials sweep: %d pending stage-outs found finished, %d credentials files removed",
                         sweep.cleared, sweep.removed)
        return ended
