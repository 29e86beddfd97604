"""From a :class:`portal.models.jobs.JobCreate` to a Slurm job: the one place a job spec is built.

A submission is checked once, in this order, before anything is stored or submitted: the image
reference's syntax, the spec (node type, GPUs, name, time, environment: :class:`slurm.spec.JobSpec`
validates on construction), then each data location against the user's roots and data sources.
Only then does the caller store the job; :func:`submit` then resolves the image (submitting its
conversion when needed: the job waits on it with ``afterok``), prepares the job folder, writes
the credentials file and hands the rendered script to ``sbatch`` as the user.
"""
from __future__ import annotations

import os
import posixpath
import pwd
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from containers.apptainer import DATA_IN_CONTAINER, job_exec_prefix
from containers.errors import ContainerError
from containers.refs import RefKind, parse_image_ref
from containers.registry import RegistryAuth
from portal.errors import ValidationError
from portal.models.jobs import JobCreate
from portal.services.images import CONVERTIBLE, check_image_file, request_image
from portal.services.job_data import attach_credentials, check_job_data
from portal.settings import Settings
from slurm.errors import SpecError
from slurm.render import render_sbatch
from slurm.spec import JOB_DATA_DIR, JOB_OUTPUT_DIR, JobSpec, resolve_node_type
from storage import bind_source
from storage.credentials import DataSource

#: the spec's fields as the create model names them (a SpecError names the spec's field)
_SPEC_FIELD = {"data": "inputs", "array": "sweep", "resources": "gpus"}
#: the image a spec is checked with before the real one is known (a conversion may be pending)
_UNRESOLVED = "/unresolved-image.sif"


@dataclass(frozen=True)
class Submission:
    """The site's side of one submission: the Unix account it runs as, its uuid (the job
    folder's name and the ``aiportal:UUID`` comment), the Slurm account of its project, and,
    for scripts power users submit themselves, their own credentials file."""

    user: str
    job_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    account: str | None = None
    credentials: str | None = None


@dataclass(frozen=True)
class Checked:
    """A submission that passed every check: its spec (image not yet resolved) and the data
    sources its locations need, by name."""

    job: JobCreate
    sub: Submission
    spec: JobSpec
    sources: Mapping[str, DataSource]
    image_auth: RegistryAuth | None = None   #: the account a registry image's conversion pulls with


@dataclass(frozen=True)
class Submitted:
    slurm_id: str
    spec: JobSpec
    script: str


def job_dir_for(settings: Settings, user: str, job_id: str) -> Path:
    """Where a job's data/, output/ and logs/ live on the shared filesystem."""
    return Path(settings.shared_root) / "users" / user / "jobs" / job_id


def check_image(ref_text: str) -> None:
    """The image reference's syntax, and whether the portal can run it (pure)."""
    try:
        ref = parse_image_ref(ref_text)
    except ContainerError as e:
        raise ValidationError("image", str(e)) from None
    if ref.kind is not RefKind.SIF and ref.kind not in CONVERTIBLE:
        raise ValidationError("image", "%s: the portal runs registry images (docker://REGISTRY/REPO:TAG), .sif "
                                       "images, and docker-archive: and oci-archive: files; ask an admin to "
                                       "build other kinds with `aiportal image convert`" % ref_text)


def split_inputs(inputs: Sequence[str], stage: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Pure: the inputs staged (copied) into /data/data, and ``(host path, container path)`` of
    those bound read-only at /data/data/NAME instead: with ``stage`` "bind", every input whose
    store can be bound (the shared filesystem; nothing is copied, so a 1 TB dataset starts as
    fast as a 1 MB one). Two inputs bound at the same NAME, the filesystem's root, and a path
    apptainer's bind syntax cannot carry are refused, naming the field and the way out."""
    staged: list[str] = []
    bound: list[tuple[str, str]] = []
    by_name: dict[str, str] = {}
    for uri in inputs:
        src = bind_source(uri) if stage == "bind" else None
        if src is None:
            staged.append(uri)
            continue
        src = posixpath.normpath(src)
        name = posixpath.basename(src)
        if not name:
            raise ValidationError("inputs", "%s: the filesystem's root cannot be bound; give a folder below it" % uri)
        if any(c in src for c in ":,\n"):
            raise ValidationError("inputs", "%s contains ':' or ',', which a bind cannot carry: rename it, or set "
                                            "stage to copy" % uri)
        if name in by_name:
            raise ValidationError("inputs", "%s and %s would both be bound at /data/data/%s: give one of them under "
                                            "another name, or set stage to copy (their contents are then merged)"
                                  % (by_name[name], uri, name))
        by_name[name] = uri
        bound.append((src, "%s/%s" % (DATA_IN_CONTAINER, name)))
    return staged, bound


def build_spec(settings: Settings, job: JobCreate, sub: Submission, image: str | None = None) -> JobSpec:
    """The job's spec on its node type's partition. ``image`` is the SIF to run (default: the
    job's image when it is a .sif path, else a placeholder until the image is resolved). A
    value the site does not accept raises ValidationError naming the create model's field."""
    if image is None:
        image = job.image if job.image.endswith(".sif") else _UNRESOLVED
    kw = {}
    if job.gpus is not None:
        kw["gpus"] = job.gpus
    sweep = job.sweep_tasks()
    if sweep:
        kw.update(array="0-%d" % (len(sweep) - 1), sweep=sweep)
    if sub.account:
        kw["account"] = sub.account
    if sub.credentials:
        kw["user_credentials"] = sub.credentials
    staged, bound = split_inputs(job.inputs, job.stage)
    try:
        node_type = resolve_node_type(job.node_type, settings.node_types)
        gpus = job.gpus if job.gpus is not None else node_type.gpus
        if job.gpu_type is not None:
            models = [m.strip() for m in node_type.gpu_type.split(",") if m.strip()]
            if job.gpu_type not in models:
                raise ValidationError("gpu_type", "node type %s has %s GPUs; choose one of them, or leave it out to "
                                                  "take any" % (node_type.name, " or ".join(models) or "no"))
            kw["gpu_type"] = job.gpu_type
        return JobSpec.for_node_type(
            node_type, name=job.name, image=image, command=tuple(job.command),
            job_dir=str(job_dir_for(settings, sub.user, sub.job_id)), inputs=tuple(staged), output=job.output,
            bound_inputs=tuple(bound), time_limit=job.time_limit, env=tuple(job.env.items()), portal_id=sub.job_id,
            stage_bin=settings.stage_bin,
            container=job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, nv=gpus > 0,
                                      binds=[(src, dst, "ro") for src, dst in bound]),
            **kw)
    except SpecError as e:
        raise ValidationError(_SPEC_FIELD.get(e.field, e.field), str(e)) from None


def check(settings: Settings, job: JobCreate, sub: Submission, sources: Mapping[str, DataSource] | None = None,
          roots: Sequence[str] | None = None, image_auth: RegistryAuth | None = None) -> Checked:
    """Every check a submission gets, each once: image syntax, the spec, each data location
    (StorageError subclasses name the location and the fix), then that the user can read the
    file a SIF or archive image names (a missing file gets the same 422). A registry image must
    already be pinned to its digest (``images.pin_image``, which checks it with the user's account)."""
    check_image(job.image)
    spec = build_spec(settings, job, sub)
    needed = check_job_data(settings, sub.user, job.inputs, job.output, sources, roots)
    check_image_file(sub.user, job.image)
    return Checked(job, sub, spec, needed, image_auth)


def render_script(settings: Settings, job: JobCreate, sub: Submission, run_folders: bool = False) -> str:
    """The batch script this submission renders to ("show script", ``aiportal script``); an
    image that is not a SIF yet shows where its conversion will be. ``run_folders``: for plain
    sbatch (``aiportal script``): each submission of the script runs in a folder of its own
    inside the job folder (:attr:`slurm.spec.JobSpec.run_folders`)."""
    check_image(job.image)
    image = None if job.image.endswith(".sif") else "/converted-on-submit/%s.sif" % job.name
    return render_sbatch(replace(build_spec(settings, job, sub, image), run_folders=run_folders))


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


def submit(settings: Settings, backend, checked: Checked) -> Submitted:
    """Submit a checked submission as its user: resolve the image (its conversion job first,
    when needed), prepare the job folder, write the credentials file, ``sbatch``."""
    sub = checked.sub
    image = request_image(settings, backend, checked.job.image, user=sub.user, auth=checked.image_auth)
    spec = replace(checked.spec, image=str(image.sif),
                   dependency="afterok:%s" % image.conversion_job if image.conversion_job else None)
    prepare_job_dir(settings, sub.user, sub.job_id)
    spec = attach_credentials(spec, sub.user, checked.sources)
    script = render_sbatch(spec)
    return Submitted(backend.submit(script, user=sub.user), spec, script)
