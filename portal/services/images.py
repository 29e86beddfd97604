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
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import select

from containers.cache import SifCache
from containers.errors import ImageRefError
from containers.refs import ImageRef, RefKind, parse_image_ref
from containers.registry import RegistryAuth, write_authfile
from portal.errors import NotFoundError, ValidationError
from portal.models import Image, ImageState, utcnow
from portal.services import registries
from portal.settings import Settings
from slurm.render import render_command_job

log = logging.getLogger(__name__)

# What the portal converts for users; definition files are built by admins (`aiportal image convert`).
# Registry images are converted pinned (docker://HOST/REPO@sha256:...; registries.pin).
CONVERTIBLE = {RefKind.DOCKER_ARCHIVE: "docker-archive", RefKind.OCI_ARCHIVE: "oci-archive",
               RefKind.DOCKER: "docker"}
#: an authfile left by a conversion job that never ran is removed after this long
_STALE_AUTHFILE_S = 6 * 3600


@dataclass(frozen=True)
class ImageRequest:
    ref: ImageRef
    sif: Path
    digest: str
    conversion_job: str | None   #: Slurm job converting it, or None when it is ready


def _builder(settings: Settings) -> pwd.struct_passwd:
    return pwd.getpwnam(settings.image_builder_user)


def _builder_dir(settings: Settings, name: str) -> Path:
    """A folder of the image cache, the builder account's alone (created if missing): incoming/
    holds copies of users' archives and registry authfiles, logs/ the conversions' logs."""
    b = _builder(settings)
    d = Path(settings.image_cache) / name
    d.mkdir(mode=0o700, exist_ok=True)
    os.chown(d, b.pw_uid, b.pw_gid)
    os.chmod(d, 0o700)
    return d


def _give_to_builder(settings: Settings, what) -> None:
    """Nothing in the cache is root's: the portal's bookkeeping files are the builder account's."""
    if os.geteuid() == 0:
        b = _builder(settings)
        if isinstance(what, int):
            os.fchown(what, b.pw_uid, b.pw_gid)
        else:
            os.chown(what, b.pw_uid, b.pw_gid)


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
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    return dest


#: the one answer for a path the user cannot use: whether it is missing or someone else's is not
#: told apart (the same words, the same status, after the same work)
NOT_FOUND_OR_NOT_YOURS = "not found, or not readable by your account (Unix user %s)"


def user_can_read(user: str, path: str) -> bool:
    """Whether Unix user ``user`` can read the regular file ``path`` themselves. As root (the
    portal), always asked as the user (``runuser ... test -r``), so a missing file and another
    user's private file cost the same and answer the same; otherwise (tests, a portal not run as
    root) whether the file exists and this process can read it."""
    if os.geteuid() != 0:
        return os.path.isfile(path) and os.access(path, os.R_OK)
    res = subprocess.run(["runuser", "-u", user, "--", "test", "-r", path, "-a", "-f", path],
                         capture_output=True, timeout=30, check=False)
    return res.returncode == 0


def check_user_can_read(user: str, path: str) -> None:
    """The portal runs as root and copies archives for the builder account, and jobs run as the
    user: a file an image reference names must be one the user could read themselves (users'
    folders are private). Missing and unreadable files get the same ImageRefError."""
    if not user_can_read(user, path):
        raise ImageRefError(path, NOT_FOUND_OR_NOT_YOURS % user)


def names_a_file(ref: ImageRef) -> bool:
    """Whether the job's user must be able to read the file ``ref`` names (a SIF or an archive)."""
    return ref.kind is RefKind.SIF or (ref.kind in CONVERTIBLE and ref.kind is not RefKind.DOCKER)


def check_image_file(user: str, ref_text: str, field: str = "image") -> None:
    """A SIF or archive reference must name a file ``user`` can read (422 naming ``field``, the same
    for a missing file and another user's); other references pass."""
    try:
        ref = parse_image_ref(ref_text)
    except ImageRefError:
        return                      # the syntax is check_image's to refuse
    if names_a_file(ref) and not user_can_read(user, str(ref.path)):
        raise unreadable_image(field, str(ref.path), user)


def unreadable_image(field: str, path: str, user: str) -> ValidationError:
    """The 422 for an image file the user cannot read (or that does not exist: the same answer)."""
    return ValidationError(field, "%s: %s" % (path, NOT_FOUND_OR_NOT_YOURS % user))


def _authfile(settings: Settings, auth: RegistryAuth, host: str) -> Path:
    """The account a conversion job pulls with: a new 0600 file of the builder account's, which
    ``aiportal image convert --authfile`` removes after use (never in the script or the log)."""
    b = _builder(settings)
    inbox = _builder_dir(settings, "incoming")
    now = time.time()
    for old in inbox.glob("auth-*.json"):          # jobs cancelled before they ran leave theirs
        try:
            if now - old.stat().st_mtime > _STALE_AUTHFILE_S:
                old.unlink()
        except OSError:
            pass
    path = inbox / ("auth-%s.json" % secrets.token_hex(16))
    return write_authfile(path, {host: auth}, b.pw_uid, b.pw_gid)


def request_image(settings: Settings, backend, ref_text: str, user: str | None = None,
                  auth: RegistryAuth | None = None) -> ImageRequest:
    """Resolve ``ref_text`` to a SIF path; submit its conversion if it is not cached yet.
    With ``user``, a file the reference names must be readable by that Unix user. A registry
    image must be pinned (``registries.pin``); ``auth`` is the account its conversion pulls with."""
    ref = parse_image_ref(ref_text)
    if ref.kind is RefKind.DOCKER and ref.digest is None:
        raise ImageRefError(ref_text, "a registry image runs pinned to a digest; the portal resolves the tag "
                                      "when the job is submitted")
    if user is not None and names_a_file(ref):
        check_user_can_read(user, str(ref.path))
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
    _builder_dir(settings, "incoming")
    source = str(ref) if ref.kind is RefKind.DOCKER else "%s:%s" % (CONVERTIBLE[ref.kind],
                                                                    _incoming(settings, digest, ref))
    with open(Path(settings.image_cache) / "incoming" / (".%s.submit.lock" % hexd), "a") as lock:
        _give_to_builder(settings, lock.fileno())
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
        argv = [settings.stage_bin, "image", "convert", source, "--cache", str(settings.image_cache)]
        if ref.kind is RefKind.DOCKER and auth is not None:
            argv += ["--authfile", str(_authfile(settings, auth, ref.registry))]
        script = render_command_job(
            name="convert-%s" % hexd[:12], partition=settings.image_build_partition,
            argv=argv,
            log_path=str(logs / "convert-%j.out"), cpus=2, time_limit="01:00:00",
            comment="aiportal:image:%s" % digest)
        job = backend.submit(script, user=settings.image_builder_user)
        pending.write_text(job + "\n")
        _give_to_builder(settings, pending)
        log.info("image %s: conversion job %s submitted", digest, job)
        return ImageRequest(ref, sif, digest, job)


# -- registered images (the portal's Images page and API) -------------------------------------

def pin_image(db, settings: Settings, box, user, ref_text: str, field: str = "image") -> tuple[str, RegistryAuth | None]:
    """A registry reference pinned to its digest with the user's account, and that account
    (see :func:`portal.services.registries.pin`: 422 naming ``field`` for an image the user's
    account cannot read, cached or not; 503 when the registry is down); other references as they
    are, None."""
    pinned = registries.pin(db, settings, box, user, ref_text, field)
    if pinned is None:
        return ref_text, None
    return str(pinned.ref), pinned.auth


def register_image(db, settings: Settings, backend, box, user, ref_text: str):
    """Register an image for ``user``: a SIF is ready at once; an archive or a registry image
    (pinned to its digest first) is converted by a Slurm job (the image is CONVERTING until the
    reconciler sees the SIF)."""
    if not ref_text:
        raise ValidationError("ref", "give an image: docker://REGISTRY/REPO:TAG, /PATH.sif, docker-archive:/PATH.tar "
                                     "or oci-archive:/PATH.tar")
    if not user.unix_user:
        raise ValidationError("user", "account %r has no Unix user; images are registered by user accounts" % user.name)
    try:
        parse_image_ref(ref_text)
        ref_text, auth = pin_image(db, settings, box, user, ref_text, field="ref")
        req = request_image(settings, backend, ref_text, user=user.unix_user, auth=auth)
    except ImageRefError as e:
        raise ValidationError("ref", str(e)) from None
    img = Image(user_id=user.id, ref=ref_text, digest=req.digest, sif_path=str(req.sif),
                state=ImageState.CONVERTING if req.conversion_job else ImageState.READY,
                conversion_job_id=req.conversion_job, updated_at=utcnow())
    db.add(img)
    db.commit()
    return img


def refresh_images(db, settings: Settings, backend) -> int:
    """CONVERTING images whose SIF appeared become READY; those whose conversion job ended
    without one become FAILED, with the conversion's own error from its log (or the job's state).
    One Slurm call for all of them."""
    from portal.services.conversions import conversion_log, ended_words, read_conversion_error
    rows = list(db.exec(select(Image).where(Image.state == ImageState.CONVERTING)))
    if not rows:
        return 0
    waiting = [i for i in rows if not Path(i.sif_path).exists()]
    statuses = backend.statuses([i.conversion_job_id for i in waiting if i.conversion_job_id]) if waiting else {}
    changed = 0
    for img in rows:
        if Path(img.sif_path).exists():
            img.state, img.message = ImageState.READY, ""
        else:
            st = statuses.get(img.conversion_job_id or "")
            if st is None or not st.state.terminal:
                continue
            img.state = ImageState.FAILED
            why = read_conversion_error(settings, img.conversion_job_id) or "ended %s without an image" % ended_words(st)
            img.message = ("conversion job %s failed: %s (log: %s)"
                           % (img.conversion_job_id, why, conversion_log(settings, img.conversion_job_id)))[:2000]
        img.updated_at = utcnow()
        db.add(img)
        changed += 1
    db.commit()
    return changed


def list_images(db, settings: Settings, backend, user):
    """The images ``user`` may see (admins: all), their conversion states refreshed from Slurm."""
    refresh_images(db, settings, backend)
    return stored_images(db, user)


def stored_images(db, user, ready_only: bool = False) -> list:
    """The images ``user`` may see as last recorded (no Slurm call), newest first; with
    ``ready_only``, the user's own images that are ready to run."""
    q = select(Image).order_by(Image.created_at.desc())
    if ready_only:
        q = q.where(Image.user_id == user.id, Image.state == ImageState.READY)
    elif not user.is_admin:
        q = q.where(Image.user_id == user.id)
    return list(db.exec(q))


def get_image(db, user, image_id: int) -> Image:
    """One registered image ``user`` may see (theirs; admins: any); else NotFoundError, the same
    for someone else's and a missing one."""
    img = db.get(Image, image_id) if 0 < image_id < 1 << 63 else None    # SQL integers are 64-bit
    if img is None or (img.user_id != user.id and not user.is_admin):
        raise NotFoundError.of("image %s" % image_id, "the Images page; GET /api/v1/images")
    return img


@dataclass(frozen=True)
class ImageDeleted:
    """What deleting a registered image did: the row is gone; its SIF in the shared cache was
    removed (``sif_removed``) or kept, and why (``kept_because``)."""

    image: Image
    sif_removed: bool
    kept_because: tuple[str, ...]


def sif_still_used(db, settings: Settings, img: Image, user) -> list[str]:
    """Why the cached SIF of ``img`` must stay after its row is gone (empty: nothing uses it).
    A SIF outside the cache (a registered /PATH.sif) is its owner's file, never removed here.
    ``user`` (who asks) hears of their own images, jobs and services by count and name; of other
    accounts', an admin does too, anyone else only that other accounts use it."""
    from sqlalchemy import or_
    from slurm.states import TERMINAL
    from portal.models import Job, Service
    cache = SifCache(Path(settings.image_cache))
    if not img.digest or Path(img.sif_path) != cache.path_for(img.digest):
        return ["it is not in the image cache (a file the portal does not own)"]
    why, others_use = [], False
    users = db.exec(select(Image.user_id).where(Image.id != img.id, Image.sif_path == img.sif_path)).all()
    jobs = db.exec(select(Job.user_id).where(Job.state.not_in(list(TERMINAL)),
                                             or_(Job.image == img.sif_path, Job.script.contains(img.sif_path)))).all()
    services = db.exec(select(Service.user_id, Service.name).where(
        or_(Service.spec_json.contains(img.sif_path), Service.next_spec_json.contains(img.sif_path)))).all()

    def seen(owner: int) -> bool:
        nonlocal others_use
        if owner == user.id or user.is_admin:
            return True
        others_use = True
        return False
    if any(s.digest == img.digest for s in registries.site_images(settings)):
        why.append("it is a site base image")
    if n := sum(seen(u) for u in users):
        why.append("%d other registered image(s) use it" % n)
    if n := sum(seen(u) for u in jobs):
        why.append("%d unfinished job(s) use it (it stays until they end; the cache keeps it after)" % n)
    if names := sorted(name for u, name in services if seen(u)):
        why.append("service(s) %s run it" % ", ".join(names))
    if others_use:
        why.append("other accounts' images, jobs or services use it")
    if img.state is ImageState.CONVERTING:
        why.append("its conversion job %s is still running (jobs may wait on it)" % img.conversion_job_id)
    return why


def delete_image(db, settings: Settings, user, image_id: int) -> ImageDeleted:
    """Delete a registered image (its owner, or an admin). Its SIF leaves the shared cache only
    when nothing else uses it (:func:`sif_still_used`): jobs that run it, or wait to, keep it."""
    row = get_image(db, user, image_id)
    why = sif_still_used(db, settings, row, user)
    img = Image.model_validate(row.model_dump())        # the image as it was, for the answer
    db.delete(row)
    db.commit()
    removed = False
    if not why:
        removed = SifCache(Path(settings.image_cache)).remove(img.digest)
        if not removed:
            why = ["it is being converted or held right now"]
    log.info("image %s (%s) deleted by %s; SIF %s%s", image_id, img.ref, user.name, img.sif_path,
             " removed" if removed else " kept: " + "; ".join(why))
    return ImageDeleted(img, removed, tuple(why))


def cache_entries(db, settings: Settings, user) -> list[dict]:
    """The SIF cache's entries: all for admins, those of the user's own images for others."""
    entries = SifCache(Path(settings.image_cache)).entries()
    if not user.is_admin:
        mine = set(db.exec(select(Image.digest).where(Image.user_id == user.id)))
        entries = [e for e in entries if e.digest in mine]
    return [{"digest": e.digest, "path": str(e.path), "size_bytes": e.size_bytes, "last_used": e.last_used,
             "refs": list(e.refs) if user.is_admin else []} for e in entries]


# -- what image fields offer, and a reference checked as it is typed ----------------------------

def recent_images(db, user, limit: int = 10) -> list[str]:
    """The images the user ran or registered last, newest first, each once."""
    from portal.models import Job
    seen: list[str] = []
    rows = list(db.exec(select(Job.image).where(Job.user_id == user.id).order_by(Job.created_at.desc()).limit(200)))
    rows += list(db.exec(select(Image.ref).where(Image.user_id == user.id).order_by(Image.created_at.desc()).limit(50)))
    for ref in rows:
        if ref and ref not in seen:
            seen.append(ref)
        if len(seen) >= limit:
            break
    return seen


def choices(db, settings: Settings, box, user):
    """The site's base images, the user's recent images, and what their registries hold."""
    from portal.models.registries import ImageChoices, RepositoryPublic, SiteImagePublic
    repos, problems = registries.browse(db, settings, box, user)
    return ImageChoices(
        site=[SiteImagePublic(name=s.name, ref=s.ref, digest=s.digest, title=s.title, description=s.description,
                              framework=s.framework) for s in registries.site_images(settings)],
        recent=recent_images(db, user),
        repositories=[RepositoryPublic(registry=r.registry, repository=r.repository, tags=list(r.tags),
                                       refs=["docker://%s/%s:%s" % (r.registry, r.repository, t) for t in r.tags])
                      for r in repos],
        problems=problems)


def check_ref(db, settings: Settings, box, user, ref_text: str):
    """Whether ``ref_text`` would run for ``user``: its syntax, and for a registry image that the
    user's account can read it now (and whether it is converted already)."""
    from portal.models.registries import ImageCheck
    from portal.errors import PortalError
    try:
        ref = parse_image_ref(ref_text)
    except ImageRefError as e:
        return ImageCheck(ref=ref_text, ok=False, message=e.reason)
    if ref.kind is RefKind.DOCKER:
        try:
            pinned, _ = pin_image(db, settings, box, user, ref_text)
        except PortalError as e:
            return ImageCheck(ref=ref_text, ok=False, message=str(e))
        sif = SifCache(Path(settings.image_cache)).path_for(parse_image_ref(pinned).digest)
        cached = sif.is_file()
        return ImageCheck(ref=ref_text, ok=True, pinned=pinned, cached=cached, sif=str(sif) if cached else None,
                          message="ready" if cached else "found; converted when the first job starts")
    if ref.kind is RefKind.SIF:
        readable = user_can_read(user.unix_user, ref.location) if user.unix_user else Path(ref.location).is_file()
        if not readable:
            return ImageCheck(ref=ref_text, ok=False, message="%s: %s" % (
                ref.location, NOT_FOUND_OR_NOT_YOURS % (user.unix_user or user.name)))
        return ImageCheck(ref=ref_text, ok=True, cached=True, sif=ref.location, message="ready")
    if ref.kind in CONVERTIBLE:
        return ImageCheck(ref=ref_text, ok=True, message="converted when the first job starts")
    return ImageCheck(ref=ref_text, ok=False, message="the portal runs registry images, .sif files and "
                                                      "docker-archive:/oci-archive: files")
