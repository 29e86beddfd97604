"""The pages' blueprint and what every page shares: template helpers, error pages, a form's
errors by field, owners' names."""
from __future__ import annotations

import datetime as dt
import logging

from flask import Blueprint, render_template
from werkzeug.exceptions import HTTPException

from portal.db_session import db
from portal.models.jobs import reason_sentence
from portal.errors import HANDLED, ValidationError, error_status
from portal.services import accounts
from slurm.states import JobState

log = logging.getLogger(__name__)

bp = Blueprint("web", __name__)

# a state's colour on the pages, by group
_STATE_GROUP = {JobState.COMPLETED: "ok", JobState.RUNNING: "run", JobState.CONFIGURING: "run",
                JobState.COMPLETING: "run", JobState.CANCELLED: "off", JobState.SUBMITTING: "wait",
                JobState.PENDING: "wait", JobState.REQUEUED: "wait", JobState.REQUEUE_HOLD: "wait",
                JobState.SUSPENDED: "wait", JobState.UNKNOWN: "off"}


# -- template helpers and error pages ----------------------------------------------------------

@bp.app_template_global()
def state_class(state) -> str:
    """CSS class of a job state (JobState or its value): ok, run, wait, off or bad."""
    if not isinstance(state, JobState):
        try:
            state = JobState(str(state))
        except ValueError:
            return "state off"
    return "state " + _STATE_GROUP.get(state, "bad" if state.terminal else "wait")


@bp.app_template_global()
def reason_text(job) -> str:
    """A job's reason in words (Slurm's code in brackets), or the portal's note."""
    return reason_sentence(job.state, job.reason)[0] or job.reason


@bp.app_template_filter("when")
def when(t: dt.datetime | float | None) -> str:
    """A time (aware or naive-UTC datetime, or a Unix timestamp) as ``YYYY-MM-DD HH:MM:SS`` UTC."""
    if t is None:
        return ""
    if isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("size")
def size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException):
    return render_template("error.html", status=e.code, title=e.name, message=e.description), e.code


def portal_error(e: Exception):
    code, status = error_status(e)
    return render_template("error.html", status=status, title=code.replace("_", " "), message=str(e)), status


for _cls in HANDLED:
    bp.register_error_handler(_cls, portal_error)


def by_field(e: ValidationError, fields) -> tuple[dict[str, str], list[str]]:
    """A form's errors: those of its own fields (shown beside each), the rest (shown on top)."""
    return ({k: v for k, v in e.errors.items() if k in fields},
            ["%s: %s" % kv for kv in e.errors.items() if kv[0] not in fields])


def owners(rows) -> dict[int, str]:
    return accounts.owner_names(db(), rows)
