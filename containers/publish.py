"""Site base images: built from definitions, published under ``site/`` in the site registry,
seeded into the SIF cache, listed in ``site-images.json``.

For each image of the catalogue (the ansible role ``site_images`` writes it)::

    definition (+ build args) --apptainer build--> BASE/STEM-KEY16.sif     only when KEY is new
    SIF --apptainer build --sandbox, umoci--> OCI layout (env, CMD, labels)
        --skopeo copy--> docker://REGISTRY/site/NAME:TAG                   only when the registry
                                                                           lacks KEY under the tag
    SIF --copy, fsync, rename--> CACHE/sha256/HEX.sif   HEX: the manifest digest the tag resolves to
    then SITE_IMAGES_FILE (atomic; the first image is the form's default)

KEY (:func:`definition_key`) is the sha256 of the definition's text, its build arguments and
the files its ``%files`` copy in, except :data:`BUILD_ONLY_FILES` (the host's CA bundle, lent to
pip for TLS and removed in ``%post``: a new CA on the host must not rebuild every image). A
definition without either hashes as its text alone, so the python image is the tests' base
image (``debian-python-<sha256[:16]>.sif``, tests/conftest.py). The pushed image carries KEY in
the label :data:`KEY_LABEL`, so a warm run asks the registry once per image (``skopeo
inspect``) and does nothing else. What a build downloads (debootstrap, pip) is not part of KEY:
pin versions in the definition.

The top of the module is pure (catalogue, keys, image config, argv, plan, the JSON document);
:class:`SitePublisher` runs the commands, each through :func:`containers.builder.run_command`.
The registry password never reaches an argv: it goes into a 0600 authfile in a 0700 temporary
folder that is removed after use.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from containers.apptainer import build_argv, exec_argv
from containers.builder import build_env, run_command
from containers.cache import SifCache, _fsync
from containers.digests import DIGEST_RE, file_sha256, source_files
from containers.errors import ContainerError, ImageBuildError, ImageRefError
from containers.refs import parse_image_ref
from containers.registry import RegistryAuth, write_authfile

log = logging.getLogger(__name__)

#: the registry namespace of the site's base images
NAMESPACE = "site"
#: ``format`` of site-images.json
FORMAT = "aiportal-site-images/1"
#: the image config label that carries the definition key the image was built from
KEY_LABEL = "org.aiportal.definition.sha256"
#: the image config label that says how the image was laid out; a new value publishes again
#: (2: the layer has its history entry, which builds FROM the image need: buildah refuses a
#: base whose history lists fewer layers than it has)
LAYOUT_LABEL = "org.aiportal.layout"
LAYOUT_VERSION = "2"
#: host files a definition copies in only for the build (and removes): not part of its key
BUILD_ONLY_FILES = frozenset({"/etc/ssl/certs/ca-certificates.crt"})
#: variables apptainer itself sets in ``apptainer exec --cleanenv``: not the image's environment
_APPTAINER_ENV = frozenset({"HOME", "PWD", "PS1", "PROMPT_COMMAND", "TERM", "SHLVL", "_", "USER",
                            "LOGNAME", "SHELL", "HOSTNAME"})
#: ... and these when they have apptainer's own values
_APPTAINER_DEFAULTS = {"LANG": "C", "LD_LIBRARY_PATH": "/.singularity.d/libs"}
_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_FRAMEWORK = re.compile(r"[a-z][a-z0-9-]*")
_ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIF_NAME = re.compile(r"(?P<stem>.+)-(?P<key>[0-9a-f]{16})\.sif")
#: the OCI conversion's work folders: WORK_PREFIX + PID-NAME-random
WORK_PREFIX = "aiportal-site-image-"
_UNKNOWN = ("manifest unknown", "name unknown", "repository name not known")
DEFAULT_TIMEOUT = 1800.0

#: ``progress(message)``: one line per step (the CLI prints them)
Progress = Callable[[str], None]
#: ``seed(digest, sif)`` puts a copy of ``sif`` into the SIF cache as ``digest``, as the cache's
#: owner (the CLI runs ``aiportal image convert SIF --as-digest DIGEST`` as the image builder
#: account); returns the cached path
Seed = Callable[[str, Path], Path]


class PublishError(ContainerError):
    """A site image could not be built, published or recorded; the message says which and why."""

    code = "site_image_publish_failed"


# -- the catalogue ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteImage:
    """One base image of the site: where it is built from and what the portal shows of it."""

    name: str                                   #: ``site/NAME`` in the registry
    definition: Path                            #: the Apptainer definition it is built from
    tag: str
    title: str
    description: str
    framework: str                              #: python, tensorflow, pytorch, ...
    build_args: tuple[tuple[str, str], ...] = ()
    cmd: tuple[str, ...] = ("python3",)         #: the OCI image's CMD

    def ref(self, registry: str) -> str:
        """``REGISTRY/site/NAME:TAG`` (no scheme)."""
        return "%s/%s/%s:%s" % (registry, NAMESPACE, self.name, self.tag)


def parse_catalogue(text: str, definitions_dir: Path) -> tuple[SiteImage, ...]:
    """The catalogue (a JSON list of images) as typed values; a relative ``definition`` is
    resolved against ``definitions_dir`` (paths come out absolute and normalised). Raises ValueError naming the entry and the field."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ValueError("the site image catalogue is not JSON: %s" % e) from e
    if not isinstance(doc, list) or not doc:
        raise ValueError("the site image catalogue must be a non-empty JSON list of images")
    known = {"name", "definition", "tag", "title", "description", "framework", "build_args", "cmd"}
    out: list[SiteImage] = []
    for n, entry in enumerate(doc):
        where = "site image %d" % n
        if not isinstance(entry, dict):
            raise ValueError("%s: expected an object, got %r" % (where, entry))
        where = "site image %r" % entry.get("name", n)
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError("%s: unknown fields %s (known: %s)" % (where, ", ".join(unknown), ", ".join(sorted(known))))
        for key in ("name", "definition", "tag", "title", "framework"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError("%s: %s must be a non-empty string" % (where, key))
        if not _NAME.fullmatch(entry["name"]):
            raise ValueError("%s: name must be lower-case letters and digits, with '.', '_' or '-' "
                             "between them" % where)
        if not _TAG.fullmatch(entry["tag"]):
            raise ValueError("%s: tag %r is not a registry tag ([A-Za-z0-9_][A-Za-z0-9_.-]*, "
                             "at most 128)" % (where, entry["tag"]))
        if not _FRAMEWORK.fullmatch(entry["framework"]):
            raise ValueError("%s: framework %r must be a lower-case word (python, tensorflow, "
                             "pytorch)" % (where, entry["framework"]))
        if not isinstance(entry.get("description", ""), str):
            raise ValueError("%s: description must be a string" % where)
        args = entry.get("build_args") or {}
        if not isinstance(args, dict) or not all(
                isinstance(k, str) and _ARG_KEY.fullmatch(k) and isinstance(v, str) for k, v in args.items()):
            raise ValueError("%s: build_args must map identifiers to strings, e.g. "
                             "{\"TF_PACKAGE\": \"tensorflow[and-cuda]==2.21.0\"}" % where)
        cmd = entry.get("cmd", ["python3"])
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) and c for c in cmd):
            raise ValueError("%s: cmd must be a non-empty list of strings" % where)
        definition = Path(os.path.abspath(Path(definitions_dir) / entry["definition"]))
        out.append(SiteImage(entry["name"], definition, entry["tag"], entry["title"],
                             entry.get("description", ""), entry["framework"],
                             tuple(sorted(args.items())), tuple(cmd)))
    names = [i.name for i in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError("site images named twice in the catalogue: %s" % ", ".join(dup))
    return tuple(out)


# -- keys and file names ---------------------------------------------------------------------

def definition_key(text: bytes, build_args: Iterable[tuple[str, str]] = (),
                   files: Iterable[tuple[str, str]] = ()) -> str:
    """HEX (sha256) of a definition's ``text``, its ``build_args`` and the ``files`` it copies in
    (``(path, sha256:HEX)``, :data:`BUILD_ONLY_FILES` left out). With neither it is the sha256 of
    the text alone."""
    h = hashlib.sha256(text)
    for key, value in sorted(build_args):
        h.update(b"\0arg\0%s=%s" % (key.encode(), value.encode()))
    for path, digest in sorted(files):
        if path not in BUILD_ONLY_FILES:
            h.update(b"\0file\0%s\0%s" % (os.fsencode(path), digest.encode()))
    return h.hexdigest()


def definition_files(definition: Path) -> list[tuple[str, str]]:
    """``(path, sha256:HEX)`` of the host files ``definition`` reads besides itself (``%files``
    sources, a local ``From:``), :data:`BUILD_ONLY_FILES` left out; reads and hashes them."""
    sources = source_files(parse_image_ref(str(definition)))[1:]
    return [(str(p), file_sha256(p)) for p in sources if str(p) not in BUILD_ONLY_FILES]


def sif_name(definition: Path, key: str) -> str:
    """``STEM-KEY16.sif``: the built image's file name in the base folder."""
    return "%s-%s.sif" % (Path(definition).stem, key[:16])


def leftover_pid(name: str) -> int | None:
    """The pid in a work folder's name (``aiportal-site-image-PID-NAME-XXXX``), else None."""
    m = re.fullmatch(re.escape(WORK_PREFIX) + r"([0-9]{1,10})-.+", name)
    return int(m.group(1)) if m else None


def stale_sifs(names: Iterable[str], definition: Path, current: str) -> list[str]:
    """Files among ``names`` that are older builds of ``definition`` (same stem, another key)."""
    stem = Path(definition).stem
    out = []
    for name in names:
        m = _SIF_NAME.fullmatch(name)
        if m and m.group("stem") == stem and name != current:
            out.append(name)
    return sorted(out)


# -- the OCI image's config ------------------------------------------------------------------

@dataclass(frozen=True)
class ImageConfig:
    """What the OCI image's config carries: environment (``K=V``), CMD and labels."""

    env: tuple[str, ...]
    cmd: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]


def image_env(env0: str) -> tuple[str, ...]:
    """The image's own environment from ``env -0`` run under ``apptainer exec --cleanenv``:
    apptainer's variables (``APPTAINER_*``, ``SINGULARITY_*``, HOME, PWD, PS1, ...) left out,
    LANG and LD_LIBRARY_PATH too while they hold apptainer's values. Sorted ``K=V`` items."""
    out = []
    for item in env0.split("\0"):
        key, sep, value = item.partition("=")
        if not sep or not _ARG_KEY.fullmatch(key):
            continue
        if key.startswith(("APPTAINER_", "SINGULARITY_")) or key in _APPTAINER_ENV:
            continue
        if _APPTAINER_DEFAULTS.get(key) == value:
            continue
        out.append("%s=%s" % (key, value))
    return tuple(sorted(out))


def image_labels(labels_json: str, key: str, version: str) -> tuple[tuple[str, str], ...]:
    """The definition's ``org.opencontainers.image.*`` labels (``.singularity.d/labels.json``
    of the image), plus ``org.opencontainers.image.version``, :data:`KEY_LABEL` and :data:`LAYOUT_LABEL`."""
    try:
        labels = json.loads(labels_json or "{}")
    except ValueError:
        labels = {}
    out = {k: str(v) for k, v in (labels if isinstance(labels, dict) else {}).items()
           if isinstance(k, str) and k.startswith("org.opencontainers.image.")}
    out["org.opencontainers.image.version"] = version
    out[KEY_LABEL] = key
    out[LAYOUT_LABEL] = LAYOUT_VERSION
    return tuple(sorted(out.items()))


def oci_layout_argvs(layout: Path, tag: str, rootfs: Path, config: ImageConfig,
                     umoci: str = "umoci") -> list[list[str]]:
    """``umoci`` steps from a root filesystem to an image ``LAYOUT:TAG``: init, new, insert
    (one layer, owners kept: needs root), config (env cleared first, then the image's)."""
    image = "%s:%s" % (layout, tag)
    configure = [umoci, "config", "--image", image, "--clear=config.env", "--clear=config.cmd",
                 "--clear=config.entrypoint", "--config.workingdir", "/"]
    for item in config.env:
        configure += ["--config.env", item]
    for arg in config.cmd:
        configure += ["--config.cmd", arg]
    for key, value in config.labels:
        configure += ["--config.label", "%s=%s" % (key, value)]
    return [
        [umoci, "init", "--layout", str(layout)],
        [umoci, "new", "--image", image],
        [umoci, "insert", "--history.created_by", "aiportal image publish-site", "--image", image, str(rootfs), "/"],
        configure,
    ]


# -- registry argv ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryAccess:
    """How skopeo reaches the registry: the 0600 authfile, TLS verification, extra CAs."""

    authfile: Path
    tls_verify: bool = True
    cert_dir: Path | None = None


def _tls_flags(prefix: str, access: RegistryAccess) -> list[str]:
    flags = ["--%stls-verify=%s" % (prefix, "true" if access.tls_verify else "false")]
    if access.tls_verify and access.cert_dir is not None:
        flags += ["--%scert-dir" % prefix, str(access.cert_dir)]
    return flags


def skopeo_push_argv(layout: Path, tag: str, ref: str, access: RegistryAccess,
                     skopeo: str = "skopeo") -> list[str]:
    """``skopeo copy`` of ``LAYOUT:TAG`` to ``docker://REF`` as a Docker v2 schema 2 image (what
    every client reads, Docker, Apptainer, buildah), with the authfile."""
    return [skopeo, "copy", "-q", "--format", "v2s2", "--authfile", str(access.authfile),
            *_tls_flags("dest-", access), "oci:%s:%s" % (layout, tag), "docker://%s" % ref]


def skopeo_inspect_argv(ref: str, access: RegistryAccess, skopeo: str = "skopeo") -> list[str]:
    """``skopeo inspect`` of ``docker://REF`` (manifest digest and labels; no tag listing)."""
    return [skopeo, "inspect", "--no-tags", "--authfile", str(access.authfile),
            *_tls_flags("", access), "docker://%s" % ref]


@dataclass(frozen=True)
class RemoteImage:
    """What the registry holds under a tag: the manifest digest and the config's labels."""

    digest: str
    labels: Mapping[str, str] = field(default_factory=dict)


def inspect_result(ref: str, returncode: int, stdout: str, stderr: str) -> RemoteImage | None:
    """``skopeo inspect``'s answer: the image, None when the registry has no such tag or
    repository; raises :class:`PublishError` for anything else (refused login, TLS, down)."""
    if returncode != 0:
        if any(s in stderr for s in _UNKNOWN):
            return None
        last = (stderr.strip().splitlines() or ["exit %d" % returncode])[-1]
        raise PublishError("cannot read %s from the registry: %s" % (ref, last))
    try:
        doc = json.loads(stdout)
    except ValueError as e:
        raise PublishError("skopeo inspect %s: not JSON: %s" % (ref, e)) from e
    digest = doc.get("Digest") if isinstance(doc, dict) else None
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise PublishError("skopeo inspect %s: no sha256 manifest digest in %r" % (ref, digest))
    labels = doc.get("Labels") or {}
    return RemoteImage(digest, {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {})


# -- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one image needs: build its SIF, push it, copy the SIF into the cache."""

    build: bool
    publish: bool

    def nothing(self) -> bool:
        return not (self.build or self.publish)


def plan(sif_exists: bool, remote: RemoteImage | None, key: str) -> Plan:
    """Build when the SIF of ``key`` is missing; publish when it is (re)built, or the registry
    has no image under the tag, or one built from another definition key or laid out otherwise."""
    build = not sif_exists
    publish = build or remote is None or remote.labels.get(KEY_LABEL) != key \
        or remote.labels.get(LAYOUT_LABEL) != LAYOUT_VERSION
    return Plan(build, publish)


# -- site-images.json ------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishedImage:
    """One image as site-images.json lists it."""

    image: SiteImage
    ref: str          #: docker://REGISTRY/site/NAME:TAG
    digest: str       #: the manifest digest the tag resolved to when published
    sif: Path         #: the SIF in the cache, at that digest


def site_images_document(published: Sequence[PublishedImage]) -> str:
    """The text of site-images.json, images in catalogue order (the first is the default)."""
    images = [{"name": p.image.name, "ref": p.ref, "digest": p.digest, "title": p.image.title,
               "description": p.image.description, "framework": p.image.framework, "sif": str(p.sif)}
              for p in published]
    return json.dumps({"format": FORMAT, "images": images}, indent=2) + "\n"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename; False (and nothing
    written) when the file already holds exactly ``text``."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    tmp = path.with_name(".%s.%d.tmp" % (path.name, os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


# -- the adapter -----------------------------------------------------------------------------

@dataclass
class Report:
    """What a run did: the images as listed, and one line per change (empty: nothing)."""

    published: list[PublishedImage] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


class SitePublisher:
    """Builds, publishes and seeds the site's images; see the module docstring.

    ``registry`` is ``HOST[:PORT]``; ``insecure`` speaks plain HTTP (throwaway registries in
    tests); ``ca_file`` is added to the system's CAs. ``cache`` receives the SIFs through
    ``seed`` (default: :meth:`SifCache.ensure` in this process, for a caller that owns the
    cache; root passes one that runs as the cache's owner). ``base_dir`` keeps the built SIFs
    (``STEM-KEY16.sif``); ``workdir`` is node-local scratch for the OCI conversion (a root
    filesystem with its owners: not NFS).
    """

    def __init__(self, *, registry: str, user: str, password_file: Path, cache: SifCache,
                 base_dir: Path, insecure: bool = False, ca_file: Path | None = None,
                 seed: Seed | None = None, workdir: Path = Path("/var/tmp"),
                 timeout: float = DEFAULT_TIMEOUT, progress: Progress | None = None):
        self.registry = registry
        self.user = user
        self.password_file = Path(password_file)
        self.cache = cache
        self.base_dir = Path(base_dir)
        self.insecure = insecure
        self.ca_file = Path(ca_file) if ca_file else None
        self.seed: Seed = seed or self._seed_here
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.say = progress or (lambda message: None)

    def run(self, images: Sequence[SiteImage], images_file: Path, jobs: int = 1) -> Report:
        """Bring every image up to date, ``jobs`` images at a time, then write ``images_file``
        (only when all of them are); one run at a time. A failure stops no other image: the
        first is raised once all have ended."""
        report = Report()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        with self._run_lock(), self._login() as access:
            self._remove_leftovers()
            changes: list[list[str]] = [[] for _ in images]
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = [pool.submit(self._one, image, access, changes[n])
                           for n, image in enumerate(images)]
            for n, future in enumerate(futures):
                report.changes += changes[n]
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]
            report.published = [f.result() for f in futures]
        if write_atomic(Path(images_file), site_images_document(report.published)):
            report.changes.append("wrote %s" % images_file)
        return report

    # -- one image -------------------------------------------------------------------------

    def _one(self, image: SiteImage, access: RegistryAccess, changes: list[str]) -> PublishedImage:
        if not image.definition.is_file():
            raise PublishError("site image %s: no definition at %s" % (image.name, image.definition))
        try:
            key = definition_key(image.definition.read_bytes(), image.build_args,
                                 definition_files(image.definition))
        except ImageRefError as e:
            raise PublishError("site image %s: %s" % (image.name, e.reason)) from e
        sif = self.base_dir / sif_name(image.definition, key)
        ref = image.ref(self.registry)
        remote = self._inspect(ref, access)
        todo = plan(sif.is_file(), remote, key)
        if todo.build:
            self._build(image, sif)
            changes.append("built %s" % sif)
        if todo.publish:
            remote = self._publish(image, sif, key, ref, access)
            changes.append("published docker://%s@%s" % (ref, remote.digest))
        assert remote is not None
        cached = self.cache.path_for(remote.digest)
        if not cached.is_file():
            self.say("%s: copying %s into the cache as %s" % (image.name, sif.name, remote.digest))
            cached = self.seed(remote.digest, sif)
            changes.append("cached %s" % cached)
        if todo.nothing():
            self.say("%s: up to date (docker://%s@%s)" % (image.name, ref, remote.digest))
        if todo.build:
            self._remove_stale(image, sif)
        return PublishedImage(image, "docker://%s" % ref, remote.digest, cached)

    def _build(self, image: SiteImage, sif: Path) -> None:
        partial = sif.with_name(".%s.%d.partial" % (sif.name, os.getpid()))
        self.say("%s: building %s from %s" % (image.name, sif.name, image.definition))
        t0 = time.monotonic()
        argv = build_argv(partial, str(image.definition), build_args=image.build_args)
        try:
            run_command(argv, self.timeout, env=build_env(), cwd=image.definition.parent,
                        hint="see the definition %s" % image.definition)
            _fsync(partial)
            os.chmod(partial, 0o644)
            os.rename(partial, sif)
            _fsync_dir(sif.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        log.info("built %s in %.0f s", sif, time.monotonic() - t0)
        self.say("%s: built in %.0f s" % (image.name, time.monotonic() - t0))

    def _publish(self, image: SiteImage, sif: Path, key: str, ref: str,
                 access: RegistryAccess) -> RemoteImage:
        t0 = time.monotonic()
        self.say("%s: publishing %s as docker://%s" % (image.name, sif.name, ref))
        self.workdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="%s%d-%s-" % (WORK_PREFIX, os.getpid(), image.name), dir=self.workdir))
        try:
            env = build_env()
            rootfs, layout = tmp / "rootfs", tmp / "oci"
            run_command(["apptainer", "build", "--sandbox", str(rootfs), str(sif)], self.timeout, env=env)
            probe = exec_argv(rootfs, ["/usr/bin/env", "-0"], contain=True, no_home=True, pwd="/", silent=True)
            env0 = run_command(probe, 120, env=env).stdout
            labels_file = rootfs / ".singularity.d" / "labels.json"
            labels = labels_file.read_text() if labels_file.is_file() else "{}"
            config = ImageConfig(image_env(env0), image.cmd, image_labels(labels, key, image.tag))
            for argv in oci_layout_argvs(layout, image.tag, rootfs, config):
                run_command(argv, self.timeout, env=env)
            shutil.rmtree(rootfs, ignore_errors=True)
            run_command(skopeo_push_argv(layout, image.tag, ref, access), self.timeout,
                        hint="is the registry up, and the account %s allowed to push to %s/?"
                             % (self.user, NAMESPACE))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        remote = self._inspect(ref, access)
        if remote is None or remote.labels.get(KEY_LABEL) != key:
            raise PublishError("pushed docker://%s, but the registry does not answer with it" % ref)
        self.say("%s: published in %.0f s: %s" % (image.name, time.monotonic() - t0, remote.digest))
        return remote

    def _inspect(self, ref: str, access: RegistryAccess) -> RemoteImage | None:
        argv = skopeo_inspect_argv(ref, access)
        try:
            res = run_command(argv, 120)
        except ImageBuildError as e:
            if e.returncode is None:
                raise PublishError("the registry did not answer for %s in 120 s" % ref) from e
            return inspect_result(ref, e.returncode, e.stdout, e.stderr)
        return inspect_result(ref, 0, res.stdout, res.stderr)

    def _seed_here(self, digest: str, sif: Path) -> Path:
        return self.cache.ensure(parse_image_ref(str(sif)), digest=digest)

    def _remove_leftovers(self) -> None:
        """What runs that died left: partial SIFs in the base folder (only one run at a time
        holds its lock) and OCI work folders of processes that are gone."""
        for partial in self.base_dir.glob(".*.partial"):
            log.info("removing %s, left by a run that died", partial)
            partial.unlink(missing_ok=True)
        for folder in self.workdir.glob(WORK_PREFIX + "*") if self.workdir.is_dir() else ():
            pid = leftover_pid(folder.name)
            if pid is not None and not _alive(pid):
                log.info("removing %s, left by a run that died", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _remove_stale(self, image: SiteImage, sif: Path) -> None:
        for name in stale_sifs((p.name for p in self.base_dir.glob("*.sif")), image.definition, sif.name):
            log.info("removing %s: an older build of %s", name, image.definition.name)
            (self.base_dir / name).unlink(missing_ok=True)

    # -- the run's lock and the registry login ---------------------------------------------

    @contextmanager
    def _run_lock(self) -> Iterator[None]:
        fd = os.open(self.base_dir / ".publish.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say("waiting for another run that publishes the site images")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _login(self) -> Iterator[RegistryAccess]:
        """A 0700 folder with the 0600 authfile (and the CA as ``ca.crt``), removed after use."""
        try:
            password = self.password_file.read_text().strip()
        except OSError as e:
            raise PublishError("cannot read the registry password of %s from %s (%s); the registry "
                               "role writes it" % (self.user, self.password_file, e.strerror)) from e
        if not password:
            raise PublishError("%s is empty" % self.password_file)
        tmp = Path(tempfile.mkdtemp(prefix="aiportal-registry-"))
        try:
            authfile = write_authfile(tmp / "auth.json", {self.registry: RegistryAuth(self.user, password)})
            cert_dir = None
            if self.ca_file is not None and self.ca_file.is_file():
                cert_dir = tmp / "certs"
                cert_dir.mkdir(mode=0o700)
                (cert_dir / "ca.crt").symlink_to(self.ca_file)
            yield RegistryAccess(authfile, tls_verify=not self.insecure, cert_dir=cert_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    _fsync(path)
