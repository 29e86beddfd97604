"""The adapter that runs apptainer, skopeo and umoci to make images.

Every command goes through :func:`run_command`: an argv list (never a shell), a timeout,
DEBUG logging of the argv, and :class:`ImageBuildError` (argv, exit code, stdout, stderr) on
failure. :class:`ApptainerBuilder` is the :class:`~containers.cache.SifCache`'s default
builder; :func:`archives_from_sif` makes docker/OCI archives of a SIF offline (for tests,
benchmarks and sites without a registry).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from containers.apptainer import build_argv, skopeo_copy_argv
from containers.errors import ImageBuildError, ImageRefError
from containers.refs import ImageRef, RefKind

log = logging.getLogger(__name__)

CAP_SYS_RESOURCE = 24
DEFAULT_BUILD_TIMEOUT = 1800.0


def drop_caps_needed(proc_status: str, euid: int) -> bool:
    """True when apptainer builds must run with ``APPTAINER_DROP_CAPS=CAP_SYS_RESOURCE``.

    Root whose bounding set lacks CAP_SYS_RESOURCE (some VMs and containers) cannot start a
    build's %post otherwise. ``proc_status`` is the text of /proc/self/status.
    """
    if euid != 0:
        return False
    for line in proc_status.splitlines():
        if line.startswith("CapBnd:"):
            return not (int(line.split()[1], 16) >> CAP_SYS_RESOURCE) & 1
    return False


def build_env(cachedir: Path | None = None, tmpdir: Path | None = None,
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for apptainer builds: the caller's, plus APPTAINER_CACHEDIR,
    APPTAINER_TMPDIR and, where root needs it, APPTAINER_DROP_CAPS."""
    env = dict(os.environ if base is None else base)
    if cachedir is not None:
        env["APPTAINER_CACHEDIR"] = str(cachedir)
    if tmpdir is not None:
        env["APPTAINER_TMPDIR"] = str(tmpdir)
    if drop_caps_needed(Path("/proc/self/status").read_text(), os.geteuid()):
        env["APPTAINER_DROP_CAPS"] = "CAP_SYS_RESOURCE"
    return env


def run_command(argv: list[str], timeout: float, env: dict[str, str] | None = None,
                cwd: Path | None = None, hint: str = "") -> subprocess.CompletedProcess:
    """Run ``argv`` with captured text output; raise :class:`ImageBuildError` unless it exits 0."""
    log.debug("run %s", shlex.join(argv))
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=cwd, check=False)
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(argv, None, _text(e.stdout), _text(e.stderr),
                              hint="gave up after %ss; raise the build timeout" % timeout) from e
    except FileNotFoundError as e:
        raise ImageBuildError(argv, 127, "", str(e),
                              hint="%s is not installed on this host" % argv[0]) from e
    if res.returncode != 0:
        raise ImageBuildError(argv, res.returncode, res.stdout, res.stderr, hint=hint)
    return res


def _text(out) -> str:
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""


class ApptainerBuilder:
    """Builds one reference into one SIF file: ``builder(ref, dest)``.

    * docker-archive, oci-archive: ``apptainer build`` (zstd);
    * oci layout: ``skopeo copy oci:DIR[:TAG] oci-archive:TMP`` first (apptainer reads
      ``oci:DIR:TAG`` as a path), then as an oci-archive;
    * definition: ``apptainer build`` in the definition's directory (relative %files);
    * SIF: copied as it is;
    * docker:// (registry): pinned references only (``NAME@sha256:...``), pulled with
      ``authfile`` (an authfile of the user's account; see :mod:`containers.registry`), over
      plain HTTP for hosts in ``insecure``.
    """

    def __init__(self, cachedir: Path | None = None, tmpdir: Path | None = None,
                 timeout: float = DEFAULT_BUILD_TIMEOUT, apptainer: str = "apptainer",
                 skopeo: str = "skopeo", authfile: Path | None = None, insecure: frozenset = frozenset()):
        self.cachedir = cachedir
        self.tmpdir = tmpdir
        self.timeout = timeout
        self.apptainer = apptainer
        self.skopeo = skopeo
        self.authfile = authfile
        self.insecure = frozenset(insecure)

    def __call__(self, ref: ImageRef, dest: Path) -> None:
        env = build_env(self.cachedir, self.tmpdir)
        if ref.kind is RefKind.DOCKER:
            if ref.digest is None:
                raise ImageRefError(ref.original, "only pinned registry images are converted "
                                                  "(docker://NAME@sha256:...)")
            argv = build_argv(dest, str(ref), apptainer=self.apptainer)
            extra = (["--authfile", str(self.authfile)] if self.authfile else []) + \
                (["--no-https"] if ref.registry in self.insecure else [])
            argv[2:2] = extra
            log.info("pulling %s into %s", ref, dest)
            run_command(argv, self.timeout, env=env)
            return
        if ref.kind is RefKind.SIF:
            log.info("copying %s to %s", ref.path, dest)
            shutil.copyfile(ref.path, dest)
            return
        if ref.kind is RefKind.OCI_LAYOUT:
            with tempfile.TemporaryDirectory(dir=self.tmpdir, prefix="oci-") as tmp:
                archive = Path(tmp) / "image.tar"
                source = "oci:%s" % ref.location
                run_command(skopeo_copy_argv(source, "oci-archive:%s" % archive, self.skopeo),
                            self.timeout, env=env)
                self._build(dest, "oci-archive:%s" % archive, env, None)
            return
        cwd = ref.path.parent if ref.kind is RefKind.DEFINITION else None
        self._build(dest, str(ref), env, cwd)

    def _build(self, dest: Path, source: str, env: dict[str, str], cwd: Path | None) -> None:
        argv = build_argv(dest, source, apptainer=self.apptainer)
        log.info("building %s from %s", dest, source)
        run_command(argv, self.timeout, env=env, cwd=cwd)


@dataclass(frozen=True)
class OfflineImage:
    """An image in the three offline forms: an OCI layout (with ``tag``) and two archives."""

    oci_layout: Path
    tag: str
    oci_archive: Path
    docker_archive: Path


def archives_from_sif(sif: Path, workdir: Path, name: str = "aiportal/image",
                      tag: str = "latest", timeout: float = 300.0) -> OfflineImage:
    """Make an OCI layout, an oci-archive and a docker-archive of ``sif`` under ``workdir``,
    with no registry and no Docker engine: ``apptainer build --sandbox``, then ``umoci`` (layout,
    CMD python3) and ``skopeo copy``. About 6 s for the 56 MB base image; needs root (umoci
    keeps file owners)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rootfs, layout = workdir / "rootfs", workdir / "oci"
    oci_tar, docker_tar = workdir / "image-oci.tar", workdir / "image-docker.tar"
    for old in (rootfs, layout):
        shutil.rmtree(old, ignore_errors=True)
    env = build_env()
    run_command(["apptainer", "build", "--sandbox", str(rootfs), str(sif)], timeout, env=env)
    image = "%s:%s" % (layout, tag)
    steps = [
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", image],
        ["umoci", "insert", "--image", image, str(rootfs), "/"],
        ["umoci", "config", "--image", image, "--config.cmd", "python3",
         "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        skopeo_copy_argv("oci:%s" % image, "docker-archive:%s:%s:%s" % (docker_tar, name, tag)),
        skopeo_copy_argv("oci:%s" % image, "oci-archive:%s:%s" % (oci_tar, tag)),
    ]
    for path in (oci_tar, docker_tar):
        path.unlink(missing_ok=True)
    for argv in steps:
        run_command(argv, timeout, env=env)
    shutil.rmtree(rootfs, ignore_errors=True)
    return OfflineImage(layout, tag, oci_tar, docker_tar)
