"""Dockerfile builds: an uploaded context becomes a Slurm job that runs buildah as the user and
pushes the image with the user's registry credentials.

:func:`start_build` checks the tag and that the user has an account on its registry, unpacks
the context tar into a new build folder under the user's job area (safely: no absolute paths,
no ``..``, no devices, no link leaving the context, a size limit), writes the build's
``build.json`` and the user's authfile (0600, the user's), and submits ``aiportal image
build-run --dir FOLDER`` as the user on ``settings.image_build_partition``. States are refreshed
lazily when builds are read: Slurm's state and the ``digest`` file the runner writes after the
push (read over SSH as the user, like logs: the folder is the user's).
"""
from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlmodel import select

from containers.build import (DIGEST_FILE, STORAGE_DRIVERS, BuildContextError, BuildSpec, BuildTarget, check_dockerfile_path, check_member,
                              link_stays_inside, parse_build_tag)
from containers.errors import ImageRefError
from containers.registry import write_authfile
from portal.errors import ConfigError, ConflictError, NotFoundError, ValidationError
from portal.logs import tail as logtail
from portal.models import BuildState, ImageBuild, utcnow
from portal.services import registries
from portal.services.submit import job_dir_for
from portal.settings import Settings
from slurm.render import render_command_job
from slurm.states import JobState

log = logging.getLogger(__name__)

#: the build folder's files
SPEC_FILE = "build.json"
AUTH_FILE = "auth.json"
CONTEXT_DIR = "context"
LOG_FILE = "logs/build.out"
#: how much of the log's end a failed build's message quotes
_TAIL_BYTES = 16 * 1024
_LOG_READ = 8 << 20
_COPY_BLOCK = 1 << 20


def build_dir_for(settings: Settings, user: str, build_id: int) -> Path:
    """A build's folder: beside the user's jobs (``.../users/U/jobs/build-N-RANDOM``). The random
    part keeps it apart from another portal's build N on the same shared filesystem (a test's, or
    one before a database was restored), whose folder would otherwise be in the way."""
    return job_dir_for(settings, user, "build-%d-%s" % (build_id, secrets.token_hex(4)))


# -- starting a build ---------------------------------------------------------------------------

def check_tag(text: str) -> BuildTarget:
    try:
        return parse_build_tag(text)
    except ImageRefError as e:
        raise ValidationError("tag", str(e)) from None


def start_build(db, settings: Settings, backend, box, user, upload: BinaryIO, tag: str,
                dockerfile: str = "Dockerfile") -> ImageBuild:
    """Check, unpack ``upload`` (a tar of the context), submit the build job as the user."""
    if not user.unix_user or user.unix_user == "root":
        raise ValidationError("user", "account %r has no Unix user; builds run as the user" % user.name)
    if settings.image_build_storage_driver not in STORAGE_DRIVERS:
        raise ConfigError("image_build_storage_driver = %r in site.toml: use one of %s"
                          % (settings.image_build_storage_driver, ", ".join(STORAGE_DRIVERS)))
    target = check_tag(tag)
    try:
        dockerfile = check_dockerfile_path(dockerfile)
    except BuildContextError as e:
        raise ValidationError("dockerfile", str(e)) from None
    auth = registries.auth_for(db, box, user, target.host)
    if auth is None:
        raise ValidationError("tag", "add your account for %s first: aiportal registry login %s"
                                     % (target.host, target.host))
    limit = settings.image_build_context_limit_mb << 20
    with tempfile.TemporaryFile() as spool:
        _spool(upload, spool, limit)
        build = ImageBuild(user_id=user.id, tag=target.name, state=BuildState.PENDING)
        db.add(build)
        db.commit()
        db.refresh(build)
        pw = pwd.getpwnam(user.unix_user)
        folder = build_dir_for(settings, user.unix_user, build.id)
        try:
            _make_private_dir(folder.parent, pw)
            os.mkdir(folder, 0o700)        # root's until it is ready: nothing can be swapped in meanwhile
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                unpack_context(spool, fd, limit)
                _check_dockerfile_present(fd, dockerfile)
                os.mkdir("logs", 0o700, dir_fd=fd)
                spec = BuildSpec(build_id=build.id, tag=target.name, dockerfile="%s/%s/%s" % (folder, CONTEXT_DIR, dockerfile),
                                 context="%s/%s" % (folder, CONTEXT_DIR), authfile="%s/%s" % (folder, AUTH_FILE),
                                 digestfile="%s/%s" % (folder, DIGEST_FILE),
                                 storage=settings.image_build_storage,
                                 storage_driver=settings.image_build_storage_driver,
                                 insecure=list(settings.registry_insecure),
                                 storage_limit_bytes=settings.image_build_storage_limit_mb << 20,
                                 max_processes=settings.image_build_max_processes,
                                 timeout_s=settings.image_build_timeout_s)
                sfd = os.open(SPEC_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
                with os.fdopen(sfd, "w") as f:
                    f.write(spec.to_json())
                # through our fd: nothing the user does to the path meanwhile can redirect it
                write_authfile(Path("/proc/self/fd/%d" % fd) / AUTH_FILE, {target.host: auth}, pw.pw_uid, pw.pw_gid)
                _chown_tree(fd, pw.pw_uid, pw.pw_gid)
            finally:
                os.close(fd)
        except BuildContextError as e:
            _fail(db, build, str(e))
            shutil.rmtree(folder, ignore_errors=True)
            raise ValidationError("context", str(e)) from None
        except BaseException as e:
            _fail(db, build, "could not prepare the build: %s" % e)
            shutil.rmtree(folder, ignore_errors=True)
            raise
    script = render_command_job(
        name="build-%d" % build.id, partition=settings.image_build_partition,
        argv=[settings.image_build_bin or settings.stage_bin, "image", "build-run", "--dir", str(folder)],
        log_path=str(folder / LOG_FILE), cpus=settings.image_build_cpus, time_limit=settings.image_build_time_limit,
        comment="aiportal:build:%d" % build.id)
    build.build_dir, build.log_path = str(folder), str(folder / LOG_FILE)
    try:
        build.slurm_job_id = backend.submit(script, user=user.unix_user)
    except Exception as e:
        _remove_authfile(user.unix_user, build)
        _fail(db, build, "the build job was not submitted: %s" % e)
        raise
    build.updated_at = utcnow()
    db.add(build)
    db.commit()
    log.info("build %d of %s: Slurm job %s as %s", build.id, build.tag, build.slurm_job_id, user.unix_user)
    return build


def _fail(db, build: ImageBuild, message: str) -> None:
    build.state, build.message = BuildState.FAILED, message[-2000:]
    build.updated_at = build.ended_at = utcnow()
    db.add(build)
    db.commit()


def _spool(upload: BinaryIO, spool, limit: int) -> None:
    total = 0
    while True:
        block = upload.read(_COPY_BLOCK)
        if not block:
            break
        total += len(block)
        if total > limit:
            raise ValidationError("context", "the context is larger than %d MB; leave big files out "
                                             "(.dockerignore) or fetch them in a RUN step" % (limit >> 20))
        spool.write(block)
    if total == 0:
        raise ValidationError("context", "send the build context as a tar (Content-Type: application/x-tar)")
    spool.seek(0)


def _make_private_dir(path: Path, pw: pwd.struct_passwd) -> None:
    for d in (path.parent, path):
        try:
            os.mkdir(d, 0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        except FileExistsError:
            pass


def _check_dockerfile_present(fd: int, dockerfile: str) -> None:
    try:
        st = os.stat("%s/%s" % (CONTEXT_DIR, dockerfile), dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise BuildContextError(dockerfile, "no such Dockerfile in the context") from None
    if not stat.S_ISREG(st.st_mode):
        raise BuildContextError(dockerfile, "the Dockerfile is not a regular file")


# -- unpacking, race-free: every path is opened relative to a folder fd, never following links ---

def unpack_context(spool, folder_fd: int, limit: int) -> int:
    """Unpack the tar in ``spool`` into ``context/`` of the folder ``folder_fd``; returns the
    bytes unpacked. Refuses (BuildContextError) what :func:`containers.build.check_member`
    refuses, members below a link, links that resolve outside, and more than ``limit`` bytes."""
    try:
        tar = tarfile.open(fileobj=spool, mode="r:*")
    except tarfile.TarError as e:
        raise BuildContextError("(the upload)", "not a tar archive (%s); pack it with tar -cf - -C DIR ." % e) from None
    os.mkdir(CONTEXT_DIR, 0o700, dir_fd=folder_fd)
    root = os.open(CONTEXT_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder_fd)
    links: dict[str, str] = {}
    total = 0
    try:
        with tar:
            for m in tar:
                kind = ("file" if m.isreg() else "dir" if m.isdir() else "symlink" if m.issym() else
                        "hardlink" if m.islnk() else "device" if (m.ischr() or m.isblk()) else
                        "fifo" if m.isfifo() else "special file")
                path = check_member(m.name, kind, m.linkname, m.size)
                if path == ".":
                    continue
                parts = path.split("/")
                for i in range(1, len(parts)):
                    if "/".join(parts[:i]) in links:
                        raise BuildContextError(m.name, "inside %r, which is a link" % "/".join(parts[:i]))
                total += max(m.size, 0)
                if total > limit:
                    raise BuildContextError(m.name, "the unpacked context is larger than %d MB" % (limit >> 20))
                parent = _open_parent(root, parts[:-1])
                try:
                    _extract(tar, m, kind, parent, parts[-1], root, links, path)
                finally:
                    if parent != root:
                        os.close(parent)
        for path in links:
            if not link_stays_inside(links, path):
                raise BuildContextError(path, "a link to %r, which resolves outside the context" % links[path])
    finally:
        os.close(root)
    return total


def _open_parent(root: int, parts: list[str]) -> int:
    fd = root
    for comp in parts:
        try:
            os.mkdir(comp, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        nxt = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        if fd != root:
            os.close(fd)
        fd = nxt
    return fd


def _extract(tar: tarfile.TarFile, m: tarfile.TarInfo, kind: str, parent: int, name: str, root: int,
             links: dict[str, str], path: str) -> None:
    mode = (m.mode & 0o755) | 0o600
    if kind == "dir":
        try:
            os.mkdir(name, mode | 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise BuildContextError(m.name, "a folder where a file already is") from None
        return
    if kind == "symlink":
        os.symlink(m.linkname, name, dir_fd=parent)
        links[path] = m.linkname
        return
    if kind == "hardlink":
        target = check_member(m.linkname, "file")
        if target in links or any("/".join(target.split("/")[:i]) in links for i in range(1, target.count("/") + 1)):
            raise BuildContextError(m.name, "a hard link to a link")
        tparent = _open_parent(root, target.split("/")[:-1])
        try:
            st = os.stat(target.split("/")[-1], dir_fd=tparent, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise BuildContextError(m.name, "a hard link to something that is not a file of the context")
            os.link(target.split("/")[-1], name, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise BuildContextError(m.name, "a hard link to %r, which is not in the context (before it)"
                                    % m.linkname) from None
        finally:
            if tparent != root:
                os.close(tparent)
        return
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        src = tar.extractfile(m)
        if src is not None:
            shutil.copyfileobj(src, out, _COPY_BLOCK)


def _chown_tree(fd: int, uid: int, gid: int) -> None:
    os.chown(fd, uid, gid)
    for _dir, dirs, files, dfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)


# -- reading builds, refreshing their states ------------------------------------------------------

def get_build(db, user, build_id: int) -> ImageBuild:
    """One build the user may see (admins: any); someone else's is NotFoundError."""
    build = db.get(ImageBuild, build_id) if 0 < build_id < 1 << 63 else None   # SQL integers are 64-bit
    if build is None or (build.user_id != user.id and not user.is_admin):
        raise NotFoundError.of("build %s" % build_id, "`aiportal image builds`")
    return build


def stored_builds(db, user, limit: int = 100) -> list[ImageBuild]:
    q = select(ImageBuild).order_by(ImageBuild.id.desc()).limit(limit)
    if not user.is_admin:
        q = q.where(ImageBuild.user_id == user.id)
    return list(db.exec(q))


def list_builds(db, settings: Settings, backend, user, limit: int = 100) -> list[ImageBuild]:
    """The builds ``user`` may see (admins: all), newest first, states refreshed from Slurm."""
    rows = stored_builds(db, user, limit)
    refresh_builds(db, settings, backend, rows)
    return rows


def refresh_builds(db, settings: Settings, backend, rows: list[ImageBuild]) -> int:
    """Bring the unfinished ``rows`` up to date: one Slurm call for all of them; a build whose
    job ended becomes PUSHED (the digest file is there), CANCELLED or FAILED (with the log's
    last error lines)."""
    live = [b for b in rows if not b.state.terminal and b.slurm_job_id]
    if not live:
        return 0
    statuses = backend.statuses([b.slurm_job_id for b in live])
    changed = 0
    for b in live:
        st = statuses.get(b.slurm_job_id)
        if st is None:
            continue
        new, message, digest = b.state, b.message, b.digest
        if not st.state.terminal:
            new = BuildState.RUNNING if st.state is JobState.RUNNING else BuildState.PENDING
        else:
            owner = _unix_user(db, b)
            digest = _read_digest(settings, owner, b)
            if st.state is JobState.COMPLETED and digest:
                new, message = BuildState.PUSHED, ""
            elif st.state is JobState.CANCELLED:
                new, message = BuildState.CANCELLED, message or "cancelled"
            else:
                new = BuildState.FAILED
                message = failure_message(st.state.value, _log_tail(settings, owner, b))
            _remove_authfile(owner, b)
        if (new, message, digest) != (b.state, b.message, b.digest):
            b.state, b.message, b.digest = new, message[-2000:], digest
            b.updated_at = utcnow()
            if new.terminal:
                b.ended_at = b.updated_at
                log.info("build %d: %s %s", b.id, new.value, digest)
            db.add(b)
            changed += 1
    if changed:
        db.commit()
    return changed


def failure_message(slurm_state: str, log_tail: str, lines: int = 6) -> str:
    """A failed build's message: the job's state and the log's last error lines (pure)."""
    text = [ln.rstrip() for ln in log_tail.splitlines() if ln.strip()]
    errors = [ln for ln in text if ln.startswith(("Error", "error", "aiportal:")) or "error" in ln.lower()]
    picked = (errors or text)[-lines:]
    return "build job ended %s%s" % (slurm_state, (": " + " | ".join(picked)) if picked else "")


def _unix_user(db, build: ImageBuild) -> str:
    from portal.models import User
    return db.get(User, build.user_id).unix_user


def _read_small(settings: Settings, unix_user: str, path: str, offset: int, limit: int) -> bytes:
    chunk = logtail.read_log(logtail.target_for(settings, unix_user), path, offset, limit)
    return chunk.data if chunk.exists else b""


def _read_digest(settings: Settings, unix_user: str, build: ImageBuild) -> str:
    """The digest the runner wrote after the push, read as the user (the folder is theirs)."""
    if not build.build_dir:
        return ""
    text = _read_small(settings, unix_user, "%s/%s" % (build.build_dir, DIGEST_FILE), 0, 200).decode("ascii", "replace")
    text = text.strip()
    return text if text.startswith("sha256:") and len(text) == 71 and all(c in "0123456789abcdef" for c in text[7:]) else ""


def _log_tail(settings: Settings, unix_user: str, build: ImageBuild) -> str:
    """The end of the build's log (its first 8 MiB are read: build logs are short)."""
    if not build.log_path:
        return ""
    data = _read_small(settings, unix_user, build.log_path, 0, _LOG_READ)
    return data[-_TAIL_BYTES:].decode("utf-8", "replace")


def read_log(settings: Settings, db, build: ImageBuild, offset: int, limit: int = 1 << 20) -> logtail.LogChunk:
    """Bytes of the build's log from ``offset``, read over SSH as the build's user."""
    if not build.log_path:
        raise NotFoundError("build %d has no log (it was not submitted)" % build.id)
    return logtail.read_log(logtail.target_for(settings, _unix_user(db, build)), build.log_path, offset, limit)


def _remove_authfile(unix_user: str, build: ImageBuild) -> None:
    """The runner removes the authfile itself; a job that never ran leaves it: remove it as the
    user (the folder is theirs: root would follow whatever they put there)."""
    if not build.build_dir:
        return
    path = "%s/%s" % (build.build_dir, AUTH_FILE)
    res = subprocess.run(["runuser", "-u", unix_user, "--", "rm", "-f", "--", path],
                         capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        log.warning("build %d: could not remove %s: %s", build.id, path, res.stderr.strip())


def cancel_build(db, settings: Settings, backend, user, build: ImageBuild) -> ImageBuild:
    """Cancel a build that has not ended (as its owner's Unix user; admins cancel any)."""
    refresh_builds(db, settings, backend, [build])
    if build.state.terminal:
        raise ConflictError("build %d has already ended (%s)" % (build.id, build.state.value))
    owner = _unix_user(db, build)
    if build.slurm_job_id:
        backend.cancel(build.slurm_job_id, user=owner)
    _remove_authfile(owner, build)
    build.state, build.message = BuildState.CANCELLED, "cancelled by %s" % user.name
    build.updated_at = build.ended_at = utcnow()
    db.add(build)
    db.commit()
    log.info("build %d cancelled by %s", build.id, user.name)
    return build
