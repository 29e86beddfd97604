"""Training requests become job specs (and, for `aiportal script`, batch script text)."""
from __future__ import annotations

import os
import pwd
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from portal.services.data import attach_credentials, check_job_data
from portal.services.images import request_image
from portal.settings import Settings
from slurm.render import render_sbatch
from slurm.spec import JobSpec, resolve_node_type


@dataclass(frozen=True)
class TrainingRequest:
    """What a user asks for: an image, a node type, data in/out and a command."""

    user: str
    image_sif: str          #: a .sif path, or an image reference (converted on demand)
    node_type: str
    command: tuple[str, ...]
    name: str = "train"
    inputs: tuple[str, ...] = ()
    output: str | None = None
    time_limit: str = "01:00:00"
    env: tuple[tuple[str, str], ...] = ()
    gpus: int | None = None
    dependency: str | None = None
    #: one environment per array task (a parameter sweep); () for a single job
    sweep: tuple[tuple[tuple[str, str], ...], ...] = ()
    account: str | None = None
    #: the user's own credentials file (absolute path), for scripts power users submit themselves
    credentials: str | None = None
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def job_dir_for(settings: Settings, user: str, job_id: str) -> Path:
    """Where a job's data/, output/ and logs/ live on the shared filesystem."""
    return Path(settings.shared_root) / "users" / user / "jobs" / job_id


def build_spec(settings: Settings, req: TrainingRequest) -> JobSpec:
    node_type = resolve_node_type(req.node_type, settings.node_types)
    kw = {}
    if req.gpus is not None:
        kw["gpus"] = req.gpus
    if req.sweep:
        kw["array"] = "0-%d" % (len(req.sweep) - 1)
        kw["sweep"] = req.sweep
    if req.account:
        kw["account"] = req.account
    if req.credentials:
        kw["user_credentials"] = req.credentials
    return JobSpec.for_node_type(
        node_type, name=req.name, image=req.image_sif, command=req.command,
        job_dir=str(job_dir_for(settings, req.user, req.job_id)), inputs=req.inputs, output=req.output,
        time_limit=req.time_limit, env=req.env, dependency=req.dependency, portal_id=req.job_id,
        stage_bin=settings.stage_bin, **kw)


def render_request(settings: Settings, req: TrainingRequest) -> str:
    return render_sbatch(build_spec(settings, req))


def prepare_job_dir(settings: Settings, user: str, job_id: str) -> Path:
    """Create the job's folder (data/, output/, logs/) owned by the user, private to them.

    Run by the portal as root before submitting: Slurm opens the log file before the script
    runs, as the job's user.
    """
    pw = pwd.getpwnam(user)
    job_dir = job_dir_for(settings, user, job_id)
    for d in (job_dir.parent, job_dir, job_dir / "data", job_dir / "output", job_dir / "logs"):
        d.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return job_dir


def submit_training(settings: Settings, backend, req: TrainingRequest, sources=None,
                    roots=None) -> tuple[str, JobSpec, str]:
    """Submit a training request as its user. Returns (Slurm job id, spec, the script submitted).

    1. validate the data locations (before anything is submitted: a bad location is refused
       with a clear message, not a failed job) and pick the data sources they need;
    2. resolve the image, submitting its conversion when needed (the job then depends on it);
    3. render, prepare the job folder, write the credentials file for the data sources;
    4. submit as the request's user.
    ``sources`` are the user's data sources by name (``storage.credentials.DataSource``).
    """
    needed = check_job_data(settings, req.user, req.inputs, req.output, sources, roots)
    image = request_image(settings, backend, req.image_sif, user=req.user)
    if image.conversion_job:
        req = replace(req, dependency="afterok:%s" % image.conversion_job)
    req = replace(req, image_sif=str(image.sif))
    spec = build_spec(settings, req)
    prepare_job_dir(settings, req.user, req.job_id)
    spec = attach_credentials(spec, req.user, needed)
    script = render_sbatch(spec)
    return backend.submit(script, user=req.user), spec, script
