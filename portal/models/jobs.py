"""A training job's models: :class:`JobBase` (the fields a user asks for, with their parsing),
:class:`JobCreate` (what the form, the API, the CLI and ``aiportal script`` send: the one model
they all parse into), :class:`JobPublic` (what the API answers); the table is
:class:`portal.models.tables.Job`, which keeps the create model whole in ``request_json`` (to show
and resubmit) beside the columns lists filter by.

A new form field is one field here (and its input in ``templates/job_new.html``); whether a value
works on this site (node type, GPUs, time syntax, image, data) is checked once, when the one job
spec is built (:mod:`portal.services.submit`).
"""
from __future__ import annotations

import json
import re
import shlex
from typing import Annotated, Any, ClassVar, Mapping

from pydantic import ConfigDict, Field, WithJsonSchema, field_validator
from sqlmodel import SQLModel

import pydantic

from portal.errors import ValidationError
from portal.models.common import OptionalTimestamp, Timestamp, as_validation_error
from portal.models.stage_out import PendingStageOut, StageOutFinishPublic
from portal.models.tables import Event, Job
from slurm.errors import SpecError
from slurm.reasons import Category, explain
from slurm.states import JobState
from slurm.sweep import expand_grid

#: at most this many array tasks in one sweep
MAX_SWEEP = 1000

_STR = {"type": "string"}
#: text with something in it but blanks (what the validators below take for a required field)
_WORDS = {"type": "string", "pattern": "\\S"}
#: one value of a sweep's parameter
_SWEEP_VALUE = {"type": ["string", "number"]}
#: null, read as the field's default (as an empty string is)
_NULL = {"type": "null"}
_OR_NULL = {"type": ["string", "null"]}


def _is_number_or_text(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _lines(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.splitlines() if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    raise TypeError("expected a list of strings or lines of text")


def _text(value: Any, default: str | None = "") -> str | None:
    """A text field: trimmed; None or empty gives the default; anything but a string is refused."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value.strip() or default


class JobBase(SQLModel):
    """The fields of a training job, as a user gives them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="train", description="a name to find the job by (letters, digits, '.', '_', '-')",
                      json_schema_extra=_OR_NULL)
    image: str = Field(description="a registered image, a .sif path, docker-archive:/PATH.tar or oci-archive:/PATH.tar",
                       examples=["/srv/aiportal/shared/images/base/debian-python.sif"], json_schema_extra=_WORDS)
    node_type: str = Field(description="1card or 4card (see GET /cluster)", examples=["1card"],
                           json_schema_extra=_WORDS)
    command: Annotated[list[str], WithJsonSchema(
        {"oneOf": [{"type": "array", "items": _STR, "minItems": 1}, _WORDS],
         "description": "the command run in the image: a list of arguments, or one string split like a shell "
                        "would (no shell runs it)"}, mode="validation")]
    inputs: Annotated[list[str], WithJsonSchema(
        {"oneOf": [{"type": "array", "items": _STR}, _STR, _NULL],
         "description": "s3://SOURCE/bucket/prefix (copied into /data/data) or shared paths (bound read-only at "
                        "/data/data/NAME, or copied: see stage); a list, or one per line"},
        mode="validation")] = []
    output: str | None = Field(default=None, description="where /data/output is kept when the job ends")
    stage: str = Field(default="bind", description="how inputs on the shared filesystem reach the job: bind (read-only "
                       "at /data/data/NAME, nothing copied; the default) or copy (into /data/data, like s3:// inputs: "
                       "for data on slow storage, or a program that writes where it reads); empty or null: bind",
                       json_schema_extra={"type": ["string", "null"], "enum": ["bind", "copy", "", None]})
    env: Annotated[dict[str, str], WithJsonSchema(
        {"oneOf": [{"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
                   _STR, {"type": "array", "items": _STR}, _NULL],
         "description": "environment variables: an object (a number or true/false is written as text, null as "
                        "empty), or NAME=VALUE lines (one string, or a list of them)"}, mode="validation")] = {}
    time_limit: str = Field(default="01:00:00", description="minutes, HH:MM:SS or D-HH:MM:SS", examples=["01:00:00"],
                            json_schema_extra=_OR_NULL)
    gpus: int | None = Field(default=None, description="GPUs (default: all of the node type's)")
    gpu_type: str | None = Field(default=None, description="the GPU model to run on, one of the node type's (GET "
                                 "/cluster); default: any GPU of its partition", json_schema_extra=_OR_NULL)
    sweep: Annotated[dict[str, list[str]], WithJsonSchema(
        {"oneOf": [{"type": "object", "additionalProperties": {"oneOf": [
                       {"type": "array", "items": _SWEEP_VALUE}, _SWEEP_VALUE]}},
                   _STR, {"type": "array", "items": _STR}, _NULL],
         "description": "a parameter grid: one array task per combination, each as environment variables "
                        "(an object of lists, or NAME=V1,V2 lines: one string, or a list of them)"},
        mode="validation")] = {}
    project: str | None = Field(default=None, description="the project the job is charged to")

    #: what to tell a user who left a required field out
    missing_messages: ClassVar[Mapping[str, str]] = {
        "image": "choose an image (a registered image, a .sif path or docker-archive:/PATH.tar)",
        "node_type": "choose a node type (1card or 4card)",
        "command": "give the command to run in the image, e.g. python3 train.py",
    }

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> str:
        return _text(v, "train")

    @field_validator("image", "node_type", mode="before")
    @classmethod
    def _required_text(cls, v: Any, info) -> str:
        value = _text(v)
        if not value:
            raise ValueError(cls.missing_messages[info.field_name])
        return value

    @field_validator("output", "project", mode="before")
    @classmethod
    def _optional_text(cls, v: Any) -> str | None:
        return _text(v, None)

    @field_validator("time_limit", mode="before")
    @classmethod
    def _time(cls, v: Any) -> str:
        return _text(v, "01:00:00")

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: Any) -> list[str]:
        if isinstance(v, str):
            try:
                words = shlex.split(v)
            except ValueError as e:
                raise ValueError("cannot split the command into words: %s" % e) from None
        elif isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v):
            words = list(v)
        elif v is None:
            words = []
        else:
            raise ValueError("give the command as a string or a list of strings")
        if not words:
            raise ValueError(cls.missing_messages["command"])
        return words

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> list[str]:
        wrong = "give a list of data locations (s3://SOURCE/bucket/prefix or shared paths)"
        if isinstance(v, (list, tuple)) and not all(isinstance(i, str) for i in v):
            raise ValueError(wrong)
        try:
            return _lines(v)
        except TypeError:
            raise ValueError(wrong) from None

    @field_validator("gpu_type", mode="before")
    @classmethod
    def _gpu_type(cls, v: Any) -> str | None:
        value = _text(v, None)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}", value):
            raise ValueError("a GPU model name: letters, digits, '.', '_' or '-' (e.g. p40)")
        return value

    @field_validator("stage", mode="before")
    @classmethod
    def _stage(cls, v: Any) -> str:
        value = _text(v, "bind")
        if value not in ("bind", "copy"):
            raise ValueError("bind (shared-filesystem inputs read-only at /data/data/NAME) or copy (into /data/data)")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> dict[str, str]:
        if isinstance(v, Mapping):
            if any(isinstance(val, (Mapping, list, tuple)) for val in v.values()):
                raise ValueError("give each variable a text value")
            return {str(k): "" if val is None else str(val) for k, val in v.items()}
        if v not in (None, "") and not isinstance(v, (str, list, tuple)):
            raise ValueError("give an object of NAME: VALUE, or NAME=VALUE lines")
        out: dict[str, str] = {}
        for line in _lines(v):
            key, sep, val = line.partition("=")
            if not sep or not key.strip():
                raise ValueError("write one NAME=VALUE per line (got %r)" % line[:80])
            out[key.strip()] = val
        return out

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> int | None:
        if v in ("", None):
            return None
        if isinstance(v, bool) or not isinstance(v, (int, str)) or not (str(v).strip().isascii()
                                                                          and str(v).strip().isdigit()):
            raise ValueError("a whole number of GPUs, 0 or more")
        return int(v)

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep(cls, v: Any) -> dict[str, list[str]]:
        """``{"LR": [0.1, 0.01]}`` or lines ``LR=0.1,0.01``."""
        if v is None or (isinstance(v, (str, Mapping)) and not v):
            return {}
        grid: dict[str, list[str]] = {}
        if isinstance(v, Mapping):
            for k, vs in v.items():
                if _is_number_or_text(vs):
                    vs = [vs]
                if not isinstance(vs, (list, tuple)) or not all(_is_number_or_text(x) for x in vs):
                    raise ValueError("give each parameter a list of values (text or numbers)")
                grid[str(k)] = [str(x) for x in vs]
        else:
            try:
                lines = _lines(v)
            except TypeError:
                raise ValueError("give NAME=V1,V2 lines or an object of lists") from None
            for line in lines:
                key, sep, vals = line.partition("=")
                values = [x.strip() for x in vals.split(",") if x.strip()]
                if not sep or not key.strip() or not values:
                    raise ValueError("write one NAME=V1,V2,... per line (got %r)" % line[:80])
                grid[key.strip()] = values
        try:
            n = len(expand_grid(grid))
        except SpecError as e:
            raise ValueError(e.args[0] if e.args else str(e)) from None
        if n > MAX_SWEEP:
            raise ValueError("the grid has %d combinations; at most %d per job" % (n, MAX_SWEEP))
        return grid


class JobCreate(JobBase):
    """A submission, as the form, the API, the CLI and ``aiportal script`` send it."""

    def sweep_tasks(self) -> tuple[tuple[tuple[str, str], ...], ...]:
        """One environment per array task (the grid's combinations); () for a single job."""
        return tuple(tuple(t.items()) for t in expand_grid(self.sweep)) if self.sweep else ()

    def as_form(self) -> dict[str, str]:
        """Each field as the form's text (what :meth:`model_validate` reads back): lists one per
        line, objects NAME=VALUE (a sweep NAME=V1,V2) per line, the command as a shell would
        split it."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if name == "command":
                out[name] = shlex.join(value)
            elif isinstance(value, list):
                out[name] = "\n".join(value)
            elif isinstance(value, dict):
                out[name] = "\n".join("%s=%s" % (k, ",".join(v) if isinstance(v, list) else v)
                                      for k, v in value.items())
            else:
                out[name] = "" if value is None else str(value)
        return out

    @classmethod
    def of_job(cls, job: Job) -> "JobCreate":
        """The request a stored job was made from (to resubmit it, or fill the form again); a
        ValidationError when there is none (a job submitted with plain sbatch)."""
        if job.external:
            raise ValidationError("job", "job %s was submitted with plain sbatch: the portal has no request to "
                                         "reuse; copy its batch script instead" % job.id)
        stored = json.loads(job.request_json or "{}")
        # a request stored before `stage` existed had its shared inputs copied: it runs as it did
        if isinstance(stored, dict) and "stage" not in stored:
            stored["stage"] = "copy"
        try:
            return cls.model_validate(stored)
        except pydantic.ValidationError as e:
            raise as_validation_error(cls, e) from None


def reason_sentence(state: JobState, reason: str) -> tuple[str, str | None]:
    """What a job's stored reason means, in words, and its category (:mod:`slurm.reasons`).

    A job that waits or runs carries Slurm's code: its sentence (Slurm's own words for a code
    the table does not know). A job that ended carries Slurm's code or the portal's own note
    (``submission failed: ...``): the sentence where the code is known, else the note as it is."""
    if not reason:
        return "", None
    r = explain(reason)
    if state.terminal and r.category is Category.OTHER:
        return reason, None
    if r.category is Category.NONE:
        return "", None
    return "%s [%s]" % (r.sentence, "%s: %s" % (r.code, r.detail) if r.detail else r.code), r.category.value


class EventPublic(SQLModel):
    at: Timestamp
    kind: str
    state: str | None = None
    node: str | None = None
    message: str

    @classmethod
    def of(cls, ev: Event) -> "EventPublic":
        return cls(at=ev.at, kind=ev.kind.value, state=ev.state.value if ev.state else None, node=ev.node,
                   message=ev.message)


class JobPublic(SQLModel):
    """The API's view of a job (never the credentials: the script carries only their path)."""

    id: str
    name: str
    owner: str | None = None
    state: str = Field(description="a Slurm job state, or SUBMITTING (stored, not yet accepted by Slurm)")
    slurm_job_id: str | None = None
    external: bool = Field(description="submitted with plain sbatch, found by the reconciler")
    node_type: str
    partition: str
    gpus: int
    image: str
    request: dict[str, Any] = Field(description="the submission as sent (a JobCreate)")
    reason: str = Field(description="Slurm's reason code (why the job waits, or how it ended), or the portal's note")
    reason_text: str = Field(default="", description="the reason in words: what it means and what to do")
    reason_category: str | None = Field(default=None, description="queue, resources, dependency, limit, held, "
                                        "node, partition, reservation, config, failure or other")
    nodes: str
    exit_code: int | None = None
    restarts: int
    created_at: Timestamp
    submitted_at: OptionalTimestamp = None
    started_at: OptionalTimestamp = None
    ended_at: OptionalTimestamp = None
    stage_out_pending: list[Any] | None = Field(default=None, description="outputs kept on the shared filesystem "
                                                "because a stage-out could not finish: its records (source, "
                                                "destination, state, reason); null when nothing is pending")
    stage_out_finish: StageOutFinishPublic | None = Field(
        default=None, description="the last attempt to finish the pending stage-out from the portal "
                                  "(POST /jobs/ID/stage-out); null when none was made or nothing is pending")

    @classmethod
    def of(cls, job: Job, owner: str | None = None) -> "JobPublic":
        text, category = reason_sentence(job.state, job.reason)
        return cls(reason_text=text, reason_category=category, id=job.id, name=job.name, owner=owner, state=job.state.value, slurm_job_id=job.slurm_job_id,
                   external=job.external, node_type=job.node_type, partition=job.partition, gpus=job.gpus,
                   image=job.image, request=job.request, reason=job.reason, nodes=job.nodes,
                   exit_code=job.exit_code, restarts=job.restarts, created_at=job.created_at,
                   submitted_at=job.submitted_at, started_at=job.started_at, ended_at=job.ended_at,
                   **_stage_out(job))


def _stage_out(job: Job) -> dict[str, Any]:
    doc = PendingStageOut.load(job.stage_out_pending)
    if doc is None:
        return {}
    return {"stage_out_pending": list(doc.records),
            "stage_out_finish": StageOutFinishPublic.of(job.id, doc.finish) if doc.finish else None}


class JobDetail(JobPublic):
    """One job with its batch script and timeline."""

    script: str
    events: list[EventPublic]


class JobPage(SQLModel):
    total: int
    limit: int
    offset: int
    jobs: list[JobPublic]
