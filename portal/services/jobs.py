"""Training jobs in the database: store first, submit, cancel, resubmit, list.

The life of a submission (docs/architecture.md): the request is parsed into a
:class:`~portal.models.jobs.JobCreate` and checked (:func:`portal.services.submit.check`: nothing
is stored for bad input), stored as ``SUBMITTING`` with a uuid, then submitted with
``--comment aiportal:UUID``; the Slurm job id is stored after. If the portal dies in between,
the reconciler finds the Slurm job by its comment (no duplicate) or, when Slurm never got it,
submits it again (no loss).
"""
from __future__ import annotations

import logging
from typing import Sequence

from sqlalchemy import func, update
from sqlmodel import Session, select

from containers.errors import ContainerError
from portal.errors import ConflictError, NotFoundError, PortalError, ValidationError
from portal.models import Event, EventKind, Job, Project, ProjectMember, User, utcnow
from portal.models.jobs import JobCreate
from portal.services import datasources, images, submit as submission
from portal.services.submit import Checked, Submission
from portal.settings import Settings
from slurm.errors import SlurmCommandError, SlurmError
from slurm.states import JobState
from storage.credentials import SecretBox
from storage.errors import StorageError

log = logging.getLogger(__name__)


def _project(db: Session, user: User, name: str | None) -> Project | None:
    if not name:
        return None
    project = db.exec(select(Project).where(Project.name == name)).first()
    if project is None or (not user.is_admin and db.get(ProjectMember, (project.id, user.id)) is None):
        raise ValidationError("project", "you are not a member of a project named %r" % name)
    return project


def _submission(user: User, project: Project | None, job_id: str | None = None) -> Submission:
    if not user.unix_user:
        raise ValidationError("user", "account %r has no Unix user, so it cannot run jobs; log in as "
                                      "a user account" % user.name)
    kw = {"job_id": job_id} if job_id else {}
    return Submission(user=user.unix_user, account=project.slurm_account if project else None, **kw)


def render_script(db: Session, settings: Settings, user: User, job: JobCreate) -> str:
    """The batch script this submission renders to ("show script"; the image as given)."""
    return submission.render_script(settings, job, _submission(user, _project(db, user, job.project)))


def _event(db: Session, job: Job, kind: EventKind, message: str, state: JobState | None = None) -> None:
    db.add(Event(kind=kind, job_id=job.id, user_id=job.user_id, state=state or job.state, message=message[:2000],
                 node=(job.nodes or None) if kind is EventKind.STATE else None))


def submit_job(db: Session, settings: Settings, backend, box: SecretBox, user: User, create: JobCreate,
               job_id: str | None = None) -> Job:
    """Check, store (``SUBMITTING``, committed), submit, store the Slurm id.

    Bad input raises ValidationError/StorageError with nothing stored. A refused submission
    marks the stored job FAILED with Slurm's message and raises. ``job_id``: the id an
    ``Idempotency-Key`` reserved for this job (default: a fresh uuid); it is the row's primary
    key, so the job is stored at most once under it."""
    project = _project(db, user, create.project)
    sub = _submission(user, project, job_id)
    submission.check_image(create.image)
    pinned, auth = images.pin_image(db, settings, box, user, create.image)
    if pinned != create.image:      # the job runs (and a resubmit reruns) this digest, whatever the tag does later
        create = create.model_copy(update={"image": pinned})
    checked = submission.check(settings, create, sub, datasources.sources_of(db, box, user), image_auth=auth)
    job = Job(id=sub.job_id, user_id=user.id, project_id=project.id if project else None, name=create.name,
              node_type=create.node_type, partition=checked.spec.partition, gpus=checked.spec.gpus,
              image=create.image, request_json=create.model_dump_json(),
              job_dir=checked.spec.job_dir)
    db.add(job)
    db.commit()     # stored before Slurm hears of it: a crash from here on is the reconciler's
    return _submit_stored(db, settings, backend, job, checked)


def _failed(db: Session, job: Job, e: Exception) -> None:
    """Record that a stored job could not be submitted (it will not be tried again)."""
    job.state = JobState.FAILED
    job.reason = ("submission failed: %s" % e)[:1024]
    job.ended_at = job.updated_at = utcnow()
    _event(db, job, EventKind.SUBMIT_FAILED, job.reason)
    db.add(job)
    db.commit()
    log.info("job %s: submission failed: %s", job.id, e)


#: the reason of a stored job whose submission found the controller down (the reconciler tries it
#: again every ``submit_retry_s``)
CONTROLLER_DOWN = "Slurm's controller did not answer"


def _controller_down(db: Session, job: Job, e: SlurmCommandError) -> None:
    """Keep a stored job whose submission found Slurm's controller down: the reconciler submits
    it when the controller is back (adopting it instead where Slurm did get it)."""
    job.reason = ("%s (%s); the portal submits it when it is back" % (CONTROLLER_DOWN, e))[:1024]
    job.updated_at = utcnow()
    _event(db, job, EventKind.STATE, job.reason)
    db.add(job)
    db.commit()
    log.warning("job %s: Slurm's controller did not answer; kept to submit later: %s", job.id, e)


def _submit_stored(db: Session, settings: Settings, backend, job: Job, checked: Checked) -> Job:
    try:
        done = submission.submit(settings, backend, checked)
    except SlurmCommandError as e:
        if e.controller_down:
            _controller_down(db, job, e)
            return job
        _failed(db, job, e)
        raise
    except (SlurmError, StorageError, ContainerError, PortalError, OSError) as e:
        _failed(db, job, e)
        raise
    job.slurm_job_id = done.slurm_id
    job.script = done.script
    job.reason = ""
    job.state = JobState.PENDING
    job.submitted_at = job.updated_at = utcnow()
    _event(db, job, EventKind.SUBMITTED, "submitted as Slurm job %s to %s" % (done.slurm_id, done.spec.partition),
           JobState.PENDING)
    db.add(job)
    db.commit()
    log.info("job %s: Slurm job %s", job.id, done.slurm_id)
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
    project = db.get(Project, job.project_id) if job.project_id else None
    log.info("job %s: stored but never submitted; submitting it now", job.id)
    try:
        create = JobCreate.of_job(job)
        _, auth = images.pin_image(db, settings, box, user, create.image)
        checked = submission.check(settings, create, _submission(user, project, job.id),
                                   datasources.sources_of(db, box, user), image_auth=auth)
    except (PortalError, StorageError, ContainerError, OSError) as e:
        _failed(db, job, e)
        raise
    return _submit_stored(db, settings, backend, job, checked)


def visible_jobs(user: User):
    q = select(Job)
    return q if user.is_admin else q.where(Job.user_id == user.id)


def get_job(db: Session, user: User, job_id: str) -> Job:
    """The job, if ``user`` may see it (theirs, or any for admins); else NotFoundError (other
    users' jobs are not told apart from missing ones)."""
    job = db.get(Job, job_id) if job_id and len(job_id) <= 36 else None
    if job is None or (job.user_id != user.id and not user.is_admin):
        raise NotFoundError.of("job %s" % job_id, "`aiportal jobs`")
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
    return submit_job(db, settings, backend, box, owner if user.is_admin else user, JobCreate.of_job(job))
