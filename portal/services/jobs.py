"""Training jobs in the database: validate, store first, submit, cancel, resubmit, list.

The life of a submission (DESIGN.md): the request is validated (nothing is stored for bad
input), stored as ``SUBMITTING`` with a uuid, then submitted with ``--comment aiportal:UUID``;
the Slurm job id is stored after. If the portal dies in between, the reconciler finds the
Slurm job by its comment (no duplicate) or, when Slurm never got it, submits it again (no loss).
"""
from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from sqlalchemy import func, update
from sqlmodel import Session, select

from containers.errors import ContainerError
from containers.refs import RefKind, parse_image_ref
from portal.errors import NotFoundError, PortalError, ValidationError
from portal.models import Event, EventKind, Job, Project, ProjectMember, User, utcnow
from portal.services import datasources
from portal.services.data import check_job_data
from portal.services.images import CONVERTIBLE
from portal.services.training import TrainingRequest, build_spec, job_dir_for, submit_training
from portal.settings import Settings
from slurm.errors import SlurmError, SpecError
from slurm.render import render_sbatch
from slurm.states import JobState
from slurm.sweep import expand_grid
from storage.credentials import SecretBox
from storage.errors import StorageError

log = logging.getLogger(__name__)

MAX_SWEEP = 1000


@dataclass(frozen=True)
class JobInput:
    """A validated submission, as the form, the API and the CLI send it."""

    image: str
    node_type: str
    command: tuple[str, ...]
    name: str = "train"
    inputs: tuple[str, ...] = ()
    output: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    time_limit: str = "01:00:00"
    gpus: int | None = None
    sweep: tuple[tuple[str, tuple[str, ...]], ...] = ()   #: grid: parameter -> values
    project: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "node_type": self.node_type, "command": list(self.command),
                "name": self.name, "inputs": list(self.inputs), "output": self.output,
                "env": dict(self.env), "time_limit": self.time_limit, "gpus": self.gpus,
                "sweep": {k: list(v) for k, v in self.sweep}, "project": self.project}


def _lines(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.splitlines() if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    raise TypeError("expected a list of strings or lines of text")


def _env(value: Any, errors: dict[str, str]) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        return tuple((str(k), "" if v is None else str(v)) for k, v in value.items())
    if value not in (None, "") and not isinstance(value, (str, list, tuple)):
        errors["env"] = "give an object of NAME: VALUE, or NAME=VALUE lines"
        return ()
    out = []
    for line in _lines(value):
        key, sep, val = line.partition("=")
        if not sep or not key.strip():
            errors["env"] = "write one NAME=VALUE per line (got %r)" % line[:80]
            return ()
        out.append((key.strip(), val))
    return tuple(out)


def _sweep(value: Any, errors: dict[str, str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{"LR": [0.1, 0.01]}`` or lines ``LR=0.1,0.01``."""
    if not value:
        return ()
    grid: dict[str, list[str]] = {}
    if isinstance(value, Mapping):
        for k, vs in value.items():
            if isinstance(vs, (str, int, float)):
                vs = [vs]
            if not isinstance(vs, (list, tuple)):
                errors["sweep"] = "give each parameter a list of values"
                return ()
            grid[str(k)] = [str(v) for v in vs]
    else:
        try:
            lines = _lines(value)
        except TypeError:
            errors["sweep"] = "give NAME=V1,V2 lines or an object of lists"
            return ()
        for line in lines:
            key, sep, vals = line.partition("=")
            values = [v.strip() for v in vals.split(",") if v.strip()]
            if not sep or not key.strip() or not values:
                errors["sweep"] = "write one NAME=V1,V2,... per line (got %r)" % line[:80]
                return ()
            grid[key.strip()] = values
    try:
        n = len(expand_grid(grid))
    except SpecError as e:
        errors["sweep"] = e.args[0] if e.args else str(e)
        return ()
    if n > MAX_SWEEP:
        errors["sweep"] = "the grid has %d combinations; at most %d per job" % (n, MAX_SWEEP)
        return ()
    return tuple((k, tuple(v)) for k, v in grid.items())


def _text(body: Mapping[str, Any], key: str, errors: dict[str, str], default: str = "") -> str:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        errors[key] = "must be a string"
        return default
    return value.strip()


def parse_job_input(body: Mapping[str, Any]) -> JobInput:
    """Validate a submission's shape (types, required fields); every problem is reported, by
    field. Whether the values work on this site (node type, image, data) is checked at submit."""
    errors: dict[str, str] = {}
    unknown = set(body) - set(JobInput.__dataclass_fields__)
    if unknown:
        errors["body"] = "unknown fields %s" % ", ".join(sorted(map(str, unknown)))
    image = _text(body, "image", errors)
    if not image and "image" not in errors:
        errors["image"] = "choose an image (a registered image, a .sif path or docker-archive:/PATH.tar)"
    node_type = _text(body, "node_type", errors)
    if not node_type and "node_type" not in errors:
        errors["node_type"] = "choose a node type (1card or 4card)"
    command: tuple[str, ...] = ()
    raw = body.get("command")
    if isinstance(raw, str):
        try:
            command = tuple(shlex.split(raw))
        except ValueError as e:
            errors["command"] = "cannot split the command into words: %s" % e
    elif isinstance(raw, (list, tuple)) and all(isinstance(a, str) for a in raw):
        command = tuple(raw)
    elif raw is not None:
        errors["command"] = "give the command as a string or a list of strings"
    if not command and "command" not in errors:
        errors["command"] = "give the command to run in the image, e.g. python3 train.py"
    try:
        raw_inputs = body.get("inputs")
        if isinstance(raw_inputs, (list, tuple)) and not all(isinstance(i, str) for i in raw_inputs):
            raise TypeError
        inputs = tuple(_lines(raw_inputs))
    except TypeError:
        errors["inputs"] = "give a list of data locations (s3://SOURCE/bucket/prefix or shared paths)"
        inputs = ()
    output = _text(body, "output", errors) or None
    env = _env(body.get("env"), errors)
    time_limit = _text(body, "time_limit", errors) or "01:00:00"
    gpus = body.get("gpus")
    if gpus in ("", None):
        gpus = None
    elif isinstance(gpus, bool) or not isinstance(gpus, (int, str)) or not str(gpus).strip().isdigit():
        errors["gpus"] = "a whole number of GPUs, 0 or more"
        gpus = None
    else:
        gpus = int(gpus)
    sweep = _sweep(body.get("sweep"), errors)
    name = _text(body, "name", errors) or "train"
    project = _text(body, "project", errors) or None
    if errors:
        raise ValidationError.of(errors)
    return JobInput(image=image, node_type=node_type, command=command, name=name, inputs=inputs,
                    output=output, env=env, time_limit=time_limit, gpus=gpus, sweep=sweep, project=project)


def _project(db: Session, user: User, name: str | None) -> Project | None:
    if not name:
        return None
    project = db.exec(select(Project).where(Project.name == name)).first()
    if project is None or (not user.is_admin and db.get(ProjectMember, (project.id, user.id)) is None):
        raise ValidationError("project", "you are not a member of a project named %r" % name)
    return project


def training_request(settings: Settings, user: User, inp: JobInput, project: Project | None = None,
                     job_id: str | None = None) -> TrainingRequest:
    """The request for ``inp`` as ``user``; SpecError-free (checked by :func:`validate`)."""
    if not user.unix_user:
        raise ValidationError("user", "account %r has no Unix user, so it cannot run jobs; log in as "
                                      "a user account" % user.name)
    sweep = tuple(tuple(t.items()) for t in expand_grid(dict(inp.sweep))) if inp.sweep else ()
    kw = {"job_id": job_id} if job_id else {}
    return TrainingRequest(user=user.unix_user, image_sif=inp.image, node_type=inp.node_type,
                           command=inp.command, name=inp.name, inputs=inp.inputs, output=inp.output,
                           time_limit=inp.time_limit, env=inp.env, gpus=inp.gpus, sweep=sweep,
                           account=project.slurm_account if project else None, **kw)


def validate(settings: Settings, req: TrainingRequest) -> None:
    """Pure checks of what the site accepts (node type, resources, names, env, time, image
    syntax): a SpecError or ImageRefError becomes a ValidationError naming the field."""
    try:
        ref = parse_image_ref(req.image_sif)
    except ContainerError as e:
        raise ValidationError("image", str(e)) from None
    if ref.kind is not RefKind.SIF and ref.kind not in CONVERTIBLE:
        raise ValidationError("image", "%s: the portal runs .sif images and converts docker-archive: and "
                                       "oci-archive: files; ask an admin to build other kinds with "
                                       "`aiportal image convert`" % req.image_sif)
    try:
        build_spec(settings, replace(req, image_sif="/validate.sif") if not req.image_sif.endswith(".sif")
                   else req)
    except SpecError as e:
        field = {"time_limit": "time_limit", "node_type": "node_type", "env": "env", "name": "name",
                 "gpus": "gpus", "command": "command", "data": "inputs", "array": "sweep"}.get(e.field, e.field)
        raise ValidationError(field, str(e)) from None


def render_script(settings: Settings, user: User, inp: JobInput, db: Session | None = None) -> str:
    """The batch script this submission renders to ("show script"; the image as given)."""
    project = _project(db, user, inp.project) if db is not None else None
    req = training_request(settings, user, inp, project)
    validate(settings, req)
    if not req.image_sif.endswith(".sif"):
        req = replace(req, image_sif="/converted-on-submit/%s.sif" % req.name)
    return render_sbatch(build_spec(settings, req))


def _event(db: Session, job: Job, kind: EventKind, message: str, state: JobState | None = None) -> None:
    db.add(Event(kind=kind, job_id=job.id, user_id=job.user_id, state=state or job.state, message=message[:2000],
                 node=(job.nodes or None) if kind is EventKind.STATE else None))


def submit_job(db: Session, settings: Settings, backend, box: SecretBox, user: User, inp: JobInput) -> Job:
    """Validate, store (``SUBMITTING``, committed), submit, store the Slurm id.

    Bad input raises ValidationError/StorageError with nothing stored. A refused submission
    marks the stored job FAILED with Slurm's message and raises."""
    project = _project(db, user, inp.project)
    req = training_request(settings, user, inp, project)
    validate(settings, req)
    sources = datasources.sources_of(db, box, user)
    check_job_data(settings, req.user, req.inputs, req.output, sources)
    job = Job(id=req.job_id, user_id=user.id, project_id=project.id if project else None, name=req.name,
              node_type=req.node_type, partition=settings.node_types[req.node_type].partition,
              gpus=req.gpus if req.gpus is not None else settings.node_types[req.node_type].gpus,
              image=inp.image, request_json=json.dumps(inp.to_json()),
              job_dir=str(job_dir_for(settings, req.user, req.job_id)))
    db.add(job)
    db.commit()     # stored before Slurm hears of it: a crash from here on is the reconciler's
    return _submit_stored(db, settings, backend, sources, job, req)


def _submit_stored(db: Session, settings: Settings, backend, sources, job: Job, req: TrainingRequest) -> Job:
    try:
        slurm_id, spec, script = submit_training(settings, backend, req, sources=sources)
    except (SlurmError, StorageError, ContainerError, PortalError, OSError) as e:
        job.state = JobState.FAILED
        job.reason = ("submission failed: %s" % e)[:1024]
        job.ended_at = job.updated_at = utcnow()
        _event(db, job, EventKind.SUBMIT_FAILED, job.reason)
        db.add(job)
        db.commit()
        log.info("job %s: submission failed: %s", job.id, e)
        raise
    job.slurm_job_id = slurm_id
    job.script = script
    job.state = JobState.PENDING
    job.submitted_at = job.updated_at = utcnow()
    _event(db, job, EventKind.SUBMITTED, "submitted as Slurm job %s to %s" % (slurm_id, spec.partition),
           JobState.PENDING)
    db.add(job)
    db.commit()
    log.info("job %s: Slurm job %s", job.id, slurm_id)
    return job


def submit_again(db: Session, settings: Settings, backend, box: SecretBox, job: Job) -> Job | None:
    """Submit a job that was stored but never reached Slurm (found by the reconciler).
    Claims the row first (compare-and-set on ``updated_at``), so two reconcilers cannot both
    submit it; returns None when someone else did."""
    claimed = db.exec(update(Job).where(Job.id == job.id, Job.state == JobState.SUBMITTING,
                                        Job.updated_at == job.updated_at)
                      .values(updated_at=utcnow()).execution_options(synchronize_session=False))
    db.commit()
    if claimed.rowcount != 1:
        return None
    db.refresh(job)
    user = db.get(User, job.user_id)
    inp = parse_job_input(job.request)
    project = db.get(Project, job.project_id) if job.project_id else None
    req = training_request(settings, user, inp, project, job_id=job.id)
    log.info("job %s: stored but never submitted; submitting it now", job.id)
    return _submit_stored(db, settings, backend, datasources.sources_of(db, box, user), job, req)


def visible_jobs(user: User):
    q = select(Job)
    return q if user.is_admin else q.where(Job.user_id == user.id)


def get_job(db: Session, user: User, job_id: str) -> Job:
    """The job, if ``user`` may see it (theirs, or any for admins); else NotFoundError (other
    users' jobs are not told apart from missing ones)."""
    job = db.get(Job, job_id) if job_id and len(job_id) <= 36 else None
    if job is None or (job.user_id != user.id and not user.is_admin):
        raise NotFoundError("job %s does not exist" % job_id)
    return job


def list_jobs(db: Session, user: User, limit: int = 50, offset: int = 0,
              states: Sequence[JobState] = ()) -> tuple[list[Job], int]:
    """A page of the jobs ``user`` may see, newest first, and the total count."""
    q = visible_jobs(user)
    if states:
        q = q.where(Job.state.in_(list(states)))
    total = db.exec(select(func.count()).select_from(q.subquery())).one()
    rows = db.exec(q.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)).all()
    return list(rows), total


def events_of(db: Session, job: Job) -> list[Event]:
    return list(db.exec(select(Event).where(Event.job_id == job.id).order_by(Event.at, Event.id)))


def cancel_job(db: Session, backend, user: User, job: Job) -> Job:
    """Ask Slurm to cancel (as the job's Unix user); the reconciler records the end."""
    if job.state.terminal:
        from portal.errors import ConflictError
        raise ConflictError("job %s has already ended (%s)" % (job.id, job.state.value))
    owner = db.get(User, job.user_id)
    if job.slurm_job_id:
        backend.cancel(job.slurm_job_id, user=owner.unix_user)
    else:
        job.state = JobState.CANCELLED
        job.ended_at = utcnow()
    job.updated_at = utcnow()
    _event(db, job, EventKind.CANCEL, "cancel requested by %s" % user.name)
    db.add(job)
    db.commit()
    return job


def resubmit_job(db: Session, settings: Settings, backend, box: SecretBox, user: User, job: Job) -> Job:
    """A new job with the same request (the old one stays as it was)."""
    if job.external:
        raise ValidationError("job", "jobs submitted with plain sbatch cannot be resubmitted from the "
                                     "portal; run sbatch again")
    owner = db.get(User, job.user_id)
    return submit_job(db, settings, backend, box, owner if user.is_admin else user, parse_job_input(job.request))


def public(job: Job, owner: str | None = None) -> dict[str, Any]:
    """The API's view of a job (never the credentials: the script carries only their path)."""
    return {
        "id": job.id, "name": job.name, "owner": owner, "state": job.state.value,
        "slurm_job_id": job.slurm_job_id, "external": job.external, "node_type": job.node_type,
        "partition": job.partition, "gpus": job.gpus, "image": job.image, "request": job.request,
        "reason": job.reason, "nodes": job.nodes, "exit_code": job.exit_code, "restarts": job.restarts,
        "created_at": _iso(job.created_at), "submitted_at": _iso(job.submitted_at),
        "started_at": _iso(job.started_at), "ended_at": _iso(job.ended_at),
        "stage_out_pending": json.loads(job.stage_out_pending) if job.stage_out_pending else None,
    }


def public_event(ev: Event) -> dict[str, Any]:
    return {"at": _iso(ev.at), "kind": ev.kind.value, "state": ev.state.value if ev.state else None,
            "node": ev.node, "message": ev.message}


def _iso(t) -> str | None:
    return t.isoformat() if t is not None else None
