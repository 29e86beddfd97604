"""Images for jobs: a reference becomes a SIF in the shared cache, converted by a Slurm job.

Slurm is the work queue: when a job's image is not converted yet, a conversion job is
submitted (as the image builder account, the only one that writes the cache) and the training
job waits for it with ``--dependency=afterok:<conversion>``. Concurrent requests for one image
share one conversion job; the cache's own lock makes sure it is built once even so.
"""
from __future__ import annotations

import fcntl
import logging
import os
import pwd
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from containers.cache import SifCache
from containers.errors import ImageRefError
from containers.refs import ImageRef, RefKind, parse_image_ref
from portal.settings import Settings
from slurm.render import render_command_job

log = logging.getLogger(__name__)

# What the portal converts for users; definition files are built by admins (`aiportal image convert`).
CONVERTIBLE = {RefKind.DOCKER_ARCHIVE: "docker-archive", RefKind.OCI_ARCHIVE: "oci-archive"}


@dataclass(frozen=True)
class ImageRequest:
    ref: ImageRef
    sif: Path
    digest: str
    conversion_job: str | None   #: Slurm job converting it, or None when it is ready


def _builder(settings: Settings) -> pwd.struct_passwd:
    return pwd.getpwnam(settings.image_builder_user)


def _builder_dir(settings: Settings, name: str) -> Path:
    """A folder of the image cache, owned by the builder account (created if missing)."""
    b = _builder(settings)
    d = Path(settings.image_cache) / name
    d.mkdir(mode=0o755, exist_ok=True)
    os.chown(d, b.pw_uid, b.pw_gid)
    return d


def _incoming(settings: Settings, digest: str, ref: ImageRef) -> Path:
    """A copy of the user's archive the builder account can read (users' folders are private)."""
    hexd = digest.split(":", 1)[-1]
    b = _builder(settings)
    inbox = _builder_dir(settings, "incoming")
    dest = inbox / ("%s.tar" % hexd)
    if not dest.exists():
        tmp = inbox / (".%s.%d.%s.partial" % (hexd, os.getpid(), secrets.token_hex(4)))
        shutil.copyfile(ref.path, tmp)
        os.chown(tmp, b.pw_uid, b.pw_gid)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    return dest


def request_image(settings: Settings, backend, ref_text: str) -> ImageRequest:
    """Resolve ``ref_text`` to a SIF path; submit its conversion if it is not cached yet."""
    ref = parse_image_ref(ref_text)
    if ref.kind is RefKind.SIF:
        return ImageRequest(ref, Path(ref.path), "", None)
    if ref.kind not in CONVERTIBLE:
        raise ImageRefError(ref_text, "the portal converts docker-archive: and oci-archive: references; "
                                      "ask an admin to build other kinds with `aiportal image convert`")
    cache = SifCache(Path(settings.image_cache))
    digest = cache.digest_of(ref)
    sif = cache.path_for(digest)
    if sif.exists():
        return ImageRequest(ref, sif, digest, None)
    hexd = digest.split(":", 1)[-1]
    pending = Path(settings.image_cache) / "incoming" / ("%s.job" % hexd)
    source = _incoming(settings, digest, ref)
    with open(Path(settings.image_cache) / "incoming" / (".%s.submit.lock" % hexd), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if sif.exists():
            return ImageRequest(ref, sif, digest, None)
        if pending.exists():
            job = pending.read_text().strip()
            st = backend.statuses([job]).get(job)
            if st is not None and not st.state.terminal:
                log.info("image %s: joining conversion job %s", digest, job)
                return ImageRequest(ref, sif, digest, job)
        logs = _builder_dir(settings, "logs")
        script = render_command_job(
            name="convert-%s" % hexd[:12], partition=settings.image_build_partition,
            argv=[settings.stage_bin, "image", "convert", "%s:%s" % (CONVERTIBLE[ref.kind], source)],
            log_path=str(logs / "convert-%j.out"), cpus=2, time_limit="01:00:00",
            comment="aiportal:image:%s" % digest)
        job = backend.submit(script, user=settings.image_builder_user)
        pending.write_text(job + "\n")
        log.info("image %s: conversion job %s submitted", digest, job)
        return ImageRequest(ref, sif, digest, job)
