"""Why an image conversion failed, and why a job that waited on a failed job never started.

A conversion is a Slurm job of the image builder account (``aiportal image convert``, submitted
by :func:`portal.services.images.request_image` with the comment ``aiportal:image:DIGEST``) whose
log is ``IMAGE_CACHE/logs/convert-JOBID.out``. When it fails, Slurm marks every job submitted
with ``--dependency=afterok:JOBID`` as DependencyNeverSatisfied; the reconciler then cancels
them and records :func:`dependency_reason`: for a conversion, the conversion's own error read
from the end of its log (:func:`conversion_error`, pure); for any other job, how it ended.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from portal.settings import Settings
from slurm.jobs import JobStatus
from slurm.reasons import dependency_failed

log = logging.getLogger(__name__)

#: the comment of conversion jobs (``aiportal:image:sha256:HEX``)
CONVERSION_COMMENT = "aiportal:image:"
#: how much of the end of a conversion's log is read for its error
LOG_TAIL_BYTES = 16384
#: the longest error taken from a log
MAX_ERROR = 600

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROGRESS = "[aiportal image] "
_COMMAND = re.compile(r"`(?P<argv>[^`]*)` (?P<rest>(?:exited|timed out).*)")
_ERROR = re.compile(r"\berror\b|Error:", re.IGNORECASE)


def conversion_log(settings: Settings, job_id: str) -> Path:
    """Where conversion job ``job_id`` logs (``render_command_job``'s ``convert-%j.out``)."""
    return Path(settings.image_cache) / "logs" / ("convert-%s.out" % job_id)


def conversion_error(text: str) -> str:
    """The last meaningful error of a conversion's log, in its own words; "" when it has none.

    In order: apptainer's last ``FATAL:`` line (what follows ``FATAL:``); else the last error
    ``aiportal image convert`` printed (``aiportal: ...``; a failed command as ``apptainer
    build exited 255: ...``, without its arguments); else the last line that reports an error
    (slurmstepd's ``*** JOB N ... CANCELLED ... DUE TO TIME LIMIT ***``, a Python exception).
    Progress lines (``[aiportal image] ...``) are never an error."""
    lines = [" ".join(_ANSI.sub("", line).split()) for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_PROGRESS)]
    for line in reversed(lines):
        if "FATAL:" in line:
            return _cut(line.rsplit("FATAL:", 1)[1].strip())
    for line in reversed(lines):
        if line.startswith("aiportal: "):
            message = line[len("aiportal: "):]
            m = _COMMAND.match(message)
            if m:
                words = m.group("argv").split()
                program = words[:2] if len(words) > 1 and not words[1].startswith("-") else words[:1]
                message = "%s %s" % (" ".join(Path(w).name if i == 0 else w for i, w in enumerate(program)),
                                     m.group("rest"))
            return _cut(message)
    for line in reversed(lines):
        if _ERROR.search(line):
            line = re.sub(r"^slurmstepd(?:-[\w.-]+)?: error: ", "", line).strip("* ")
            return _cut(line)
    return ""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 3].rstrip() + "..."


def read_conversion_error(settings: Settings, job_id: str) -> str:
    """:func:`conversion_error` of the end of conversion ``job_id``'s log; "" when the log is
    missing or unreadable (logged)."""
    path = conversion_log(settings, job_id)
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        log.warning("conversion job %s: cannot read its log %s: %s", job_id, path, e)
        return ""
    if size > LOG_TAIL_BYTES:
        tail = tail.split("\n", 1)[-1]       # the first line read may be cut
    return conversion_error(tail)


def is_conversion(record: JobStatus | None) -> bool:
    """The job is an image conversion (its comment says so)."""
    return record is not None and record.comment.startswith(CONVERSION_COMMENT)


def ended_words(record: JobStatus | None) -> str:
    """How a job ended, in a few words (``FAILED with exit code 1``); "" when unknown."""
    if record is None:
        return ""
    words = record.state.value
    if record.exit_code:
        words += " with exit code %d" % record.exit_code
    if record.signal:
        words += " (signal %d)" % record.signal
    return words


def dependency_reason(settings: Settings, job_id: str, record: JobStatus | None) -> str:
    """The reason a job that depended on Slurm job ``job_id`` (``record``: how that job ended,
    None when Slurm no longer says) is ended with: for an image conversion, the conversion's
    own error from its log; otherwise how that job ended."""
    if is_conversion(record):
        why = read_conversion_error(settings, job_id) or ended_words(record)
        return dependency_failed(job_id, why, "its image conversion")
    return dependency_failed(job_id, ended_words(record))
