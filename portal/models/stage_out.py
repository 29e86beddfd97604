"""A job's pending stage-out, as the jobs table keeps it (``Job.stage_out_pending``) and as the
API shows it.

The column holds one JSON document, :class:`PendingStageOut`: the stage-out records the job left
in its folder (``STAGE_OUT_PENDING.*.json``, written by :func:`storage.stage.stage_out`: source,
destination, state, reason, the command that finishes it) and the last "finish stage-out"
attempt the portal made (:class:`StageOutFinish`). Null means nothing is pending. The reconciler
writes the records alone as a JSON list when it records a job's end; that form is read as a
document without an attempt.
"""
from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any

import pydantic
from pydantic import ConfigDict, Field
from sqlmodel import SQLModel

from portal.models.common import OptionalTimestamp, Timestamp

FORMAT = "aiportal-stage-out/1"


class FinishState(enum.Enum):
    """Where the last "finish stage-out" attempt of a job stands."""

    SUBMITTING = "submitting"    #: claimed by a request; its Slurm job is being submitted
    RUNNING = "running"          #: its Slurm job (``aiportal stage out`` as the job's user) is queued or running
    FAILED = "failed"            #: it ended and something is still pending (``reason`` says why); try again


class StageOutFinish(pydantic.BaseModel):
    """One "finish stage-out" attempt."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: FinishState
    requested_at: dt.datetime
    requested_by: str
    slurm_job_id: str | None = None
    ended_at: dt.datetime | None = None
    reason: str = ""

    @property
    def open(self) -> bool:
        """Not over yet: a second attempt must wait."""
        return self.state is not FinishState.FAILED


class PendingStageOut(pydantic.BaseModel):
    """What ``Job.stage_out_pending`` holds: the records, and the last attempt to finish them."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    records: tuple[dict[str, Any], ...] = ()
    finish: StageOutFinish | None = None

    @classmethod
    def load(cls, text: str | None) -> "PendingStageOut | None":
        """The column's document; None when nothing is pending. A JSON list is the
        reconciler's form (records only); anything unreadable counts as records of its own, so
        that a pending stage-out is never taken for none."""
        if not text:
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            return cls(records=({"state": "unknown", "reason": "the stored record is not JSON"},))
        if isinstance(doc, list):
            return cls(records=tuple(r for r in doc if isinstance(r, dict)))
        try:
            return cls.model_validate(doc)
        except pydantic.ValidationError:
            return cls(records=({"state": "unknown", "reason": "the stored record is not readable"},))

    def dump(self) -> str:
        return json.dumps({"format": FORMAT, **self.model_dump(mode="json")})


class StageOutFinishPublic(SQLModel):
    """The API's view of the last "finish stage-out" attempt of a job."""

    state: str = Field(description="submitting, running (its Slurm job is queued or running), or failed "
                                   "(something is still pending: see reason; try again)")
    slurm_job_id: str | None = Field(default=None, description="the Slurm job that runs `aiportal stage out` "
                                                                 "as the job's user")
    requested_at: Timestamp
    requested_by: str
    ended_at: OptionalTimestamp = None
    reason: str = ""
    log: str = Field(description="its log (API path): JOB_DIR/logs/stage-out.out, every attempt appended")

    @classmethod
    def of(cls, job_id: str, finish: StageOutFinish) -> "StageOutFinishPublic":
        return cls(state=finish.state.value, slurm_job_id=finish.slurm_job_id, requested_at=finish.requested_at,
                   requested_by=finish.requested_by, ended_at=finish.ended_at, reason=finish.reason,
                   log="/api/v1/jobs/%s/stage-out/log" % job_id)
