"""Dockerfile builds with buildah, rootless, as the user (pure: argv lists, paths and checks).

A build runs inside a Slurm job as the user who asked for it (``aiportal image build-run``
runs these commands): ``buildah bud`` with the ``vfs`` storage driver and ``--isolation
chroot`` (the only isolation that works without cgroups; ``RUN`` steps run as root of a user
namespace mapped onto the user's /etc/subuid range), then ``buildah push`` with the user's
registry credentials in an authfile. The storage lives on the node's local disk, one folder
per user (vfs copies every layer: on NFS it would be slow), never shared between users.

Nothing here runs a command or touches a file: the runner (``portal.cli.builds``) does.
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass

from containers.errors import ContainerError, ImageRefError
from containers.refs import RefKind, parse_image_ref

#: a Unix user name buildah storage may be named after
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
#: the file in a build folder that holds the pushed manifest digest
DIGEST_FILE = "digest"
#: what a tar member of a build context may be
MEMBER_KINDS = ("file", "dir", "symlink", "hardlink")


class BuildContextError(ContainerError):
    """A member of an uploaded build context is refused (absolute, ``..``, a device, a link
    pointing outside the context, too big)."""

    code = "invalid_build_context"

    def __init__(self, member: str, reason: str):
        self.member, self.reason = member, reason
        super().__init__("build context member %r: %s" % (member, reason))


@dataclass(frozen=True)
class BuildTarget:
    """Where a build is pushed: ``host/repository:tag`` (the tag defaults to ``latest``)."""

    host: str
    repository: str
    tag: str

    @property
    def name(self) -> str:
        """``host/repository:tag``, what buildah tags the image as and pushes."""
        return "%s/%s:%s" % (self.host, self.repository, self.tag)

    def pinned(self, digest: str) -> str:
        """``host/repository@sha256:...``: the pushed image, whatever the tag later points at."""
        return "%s/%s@%s" % (self.host, self.repository, digest)


@dataclass(frozen=True)
class BuildSpec:
    """What the in-job runner reads (``build.json``): everything it needs, so it reads no
    settings of its own."""

    build_id: int
    tag: str                       #: host/repository:tag
    dockerfile: str                #: absolute, inside context
    context: str
    authfile: str
    digestfile: str
    storage: str                   #: node-local buildah storage of the user
    insecure: list[str]            #: registries spoken to over plain HTTP
    storage_limit_bytes: int
    max_processes: int
    timeout_s: float
    storage_driver: str = "overlay"    #: buildah's storage driver (see Storage)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BuildSpec":
        return cls(**json.loads(text))


def parse_build_tag(text: str) -> BuildTarget:
    """``REGISTRY/REPO[:TAG]`` (``docker://`` optional) -> :class:`BuildTarget`. The registry
    host is required (builds are pushed, never kept in a local engine) and a digest is refused
    (it is what the push produces)."""
    text = (text or "").strip()
    ref = parse_image_ref(text if text.startswith("docker://") else "docker://" + text)
    if ref.kind is not RefKind.DOCKER:
        raise ImageRefError(text, "give the tag to push as REGISTRY/REPOSITORY:TAG")
    name = ref.location
    if "@" in name:
        raise ImageRefError(text, "a build is pushed to a tag, not a digest; drop @sha256:...")
    host, sep, rest = name.partition("/")
    if not sep or not ("." in host or ":" in host or host == "localhost"):
        raise ImageRefError(text, "name the registry: e.g. localhost:5000/%s" % name)
    repo, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    return BuildTarget(host, repo, tag or "latest")


def storage_dir(template: str, user: str) -> str:
    """The node-local buildah storage of ``user``: ``template`` with ``{user}`` filled in."""
    if not _USER.fullmatch(user or "") or user == "root":
        raise ValueError("not a build user: %r" % user)
    if "{user}" not in template:
        raise ValueError("the build storage setting %r must contain {user} (storage is per user)" % template)
    path = template.format(user=user)
    if not path.startswith("/") or posixpath.normpath(path) != path:
        raise ValueError("the build storage %r must be an absolute, normalised path" % path)
    return path


#: buildah storage drivers a build may use: ``overlay`` (rootless in the kernel's user namespace,
#: Linux >= 5.11: a build FROM a 500 MB base starts in a second and commits only its own changes)
#: and ``vfs`` (works everywhere, but copies the whole base for every build and scans it to
#: commit: ~25 s per build on the TensorFlow base here; bench/bench_build.py)
STORAGE_DRIVERS = ("overlay", "vfs")


@dataclass(frozen=True)
class Storage:
    """One user's buildah storage folder and what buildah keeps in it (one image store per
    driver: buildah refuses a store written by another driver)."""

    base: str
    driver: str = "overlay"

    def __post_init__(self):
        if self.driver not in STORAGE_DRIVERS:
            raise ValueError("buildah storage driver %r: use one of %s" % (self.driver, ", ".join(STORAGE_DRIVERS)))

    @property
    def root(self) -> str:
        return self.base + ("/root" if self.driver == "vfs" else "/root-" + self.driver)

    def roots(self) -> tuple[str, ...]:
        """The image stores of every driver (a wipe removes them all: the limit counts them all)."""
        return tuple(Storage(self.base, d).root for d in STORAGE_DRIVERS)

    @property
    def runroot(self) -> str:
        return self.base + "/runroot"

    @property
    def home(self) -> str:
        return self.base + "/home"

    @property
    def xdg_runtime(self) -> str:
        return self.base + "/run"

    @property
    def tmp(self) -> str:
        return self.base + "/tmp"

    def folders(self) -> tuple[str, ...]:
        """The folders the runner creates (0700) before buildah runs."""
        return (self.base, self.home, self.xdg_runtime, self.tmp)


@dataclass(frozen=True)
class Limits:
    """What one build may use. ``max_processes`` is RLIMIT_NPROC: it counts the user's
    processes on the node (a user namespace's ids are charged to its owner); ``max_file_bytes``
    is RLIMIT_FSIZE (a ``RUN`` step writing a bigger file gets SIGXFSZ); ``storage_bytes``
    bounds the whole storage folder (checked by the runner while buildah runs)."""

    max_processes: int = 4096
    max_file_bytes: int = 20 << 30
    storage_bytes: int = 20 << 30

    def prlimit_argv(self) -> list[str]:
        """``prlimit`` with the limits, as a prefix of the command it runs."""
        return ["prlimit", "--nproc=%d:%d" % (self.max_processes, self.max_processes),
                "--fsize=%d:%d" % (self.max_file_bytes, self.max_file_bytes), "--"]


def _buildah(storage: Storage, buildah: str) -> list[str]:
    return [buildah, "--storage-driver", storage.driver, "--root", storage.root, "--runroot", storage.runroot]


def _tls(host: str, insecure: frozenset[str] | tuple[str, ...]) -> list[str]:
    return ["--tls-verify=false"] if host in insecure else []


def bud_argv(storage: Storage, dockerfile: str, target: BuildTarget, context: str, authfile: str,
             insecure: frozenset[str] | tuple[str, ...] = (), limits: Limits | None = None,
             buildah: str = "buildah") -> list[str]:
    """``buildah bud`` of ``dockerfile`` in ``context``, tagged ``target``; base images are
    pulled with the authfile (plain HTTP only for the tag's host when it is insecure: base
    images on another registry are verified)."""
    for what, path in (("dockerfile", dockerfile), ("context", context), ("authfile", authfile)):
        if not path.startswith("/"):
            raise ValueError("%s must be an absolute path: %r" % (what, path))
    return ((limits.prlimit_argv() if limits else []) + _buildah(storage, buildah)
            + ["bud", "--isolation", "chroot", "--authfile", authfile]
            + _tls(target.host, insecure) + ["-f", dockerfile, "-t", target.name, context])


def push_argv(storage: Storage, target: BuildTarget, authfile: str, digestfile: str,
              insecure: frozenset[str] | tuple[str, ...] = (), buildah: str = "buildah") -> list[str]:
    """``buildah push`` of the built tag to its registry; the manifest digest to ``digestfile``."""
    return (_buildah(storage, buildah) + ["push", "--authfile", authfile, "--digestfile", digestfile]
            + _tls(target.host, insecure) + [target.name, "docker://" + target.name])


def rmi_argv(storage: Storage, target: BuildTarget, buildah: str = "buildah") -> list[str]:
    """Forget the built image locally (it is in the registry now; base layers stay cached)."""
    return _buildah(storage, buildah) + ["rmi", "--force", target.name]


def prune_argv(storage: Storage, buildah: str = "buildah") -> list[str]:
    """Remove working containers left by an interrupted build."""
    return _buildah(storage, buildah) + ["rm", "--all"]


def usage_argv(storage: Storage, buildah: str = "buildah") -> list[str]:
    """Bytes on disk of the storage (inside the user namespace: the layers belong to subuids; not
    counting what is mounted in it, e.g. a build's overlay view of its base)."""
    return _buildah(storage, buildah) + ["unshare", "--", "du", "-s", "-x", "-B1", "--", storage.base]


def wipe_argv(storage: Storage, buildah: str = "buildah") -> list[str]:
    """Remove all of the user's build storage (inside the user namespace, for the same reason)."""
    return _buildah(storage, buildah) + ["unshare", "--", "rm", "-rf", "--", *storage.roots(), storage.runroot,
                                         storage.tmp]


def build_env(storage: Storage, path: str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin") -> dict[str, str]:
    """The environment buildah runs with: HOME and XDG_RUNTIME_DIR in folders the user owns
    (buildah keeps its state there), temporary files inside the storage (counted in its limit)."""
    return {"HOME": storage.home, "XDG_RUNTIME_DIR": storage.xdg_runtime, "TMPDIR": storage.tmp,
            "PATH": path, "LC_ALL": "C", "BUILDAH_ISOLATION": "chroot"}


def check_member(name: str, kind: str, linkname: str = "", size: int = 0) -> str:
    """A tar member of a build context, checked (pure): its path normalised and relative; a
    link must stay inside the context; only files, folders and links. Returns the path."""
    if kind not in MEMBER_KINDS:
        raise BuildContextError(name, "a %s; a build context holds only files, folders and links" % kind)
    if "\0" in name or "\n" in name:
        raise BuildContextError(name, "control characters in the name")
    if name.startswith("/"):
        raise BuildContextError(name, "an absolute path; pack the context with relative paths (tar -C DIR .)")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in "/%s/" % name:
        raise BuildContextError(name, "'..' in the path: it would land outside the context")
    if size < 0:
        raise BuildContextError(name, "negative size")
    if kind == "symlink":
        target = posixpath.normpath(posixpath.join(posixpath.dirname(norm), linkname))
        if linkname.startswith("/") or target == ".." or target.startswith("../"):
            raise BuildContextError(name, "a link to %r, outside the context" % linkname)
    if kind == "hardlink":
        target = posixpath.normpath(linkname)
        if linkname.startswith("/") or target == ".." or target.startswith("../"):
            raise BuildContextError(name, "a hard link to %r, outside the context" % linkname)
    return "." if norm in ("", ".") else norm


def check_dockerfile_path(text: str) -> str:
    """The Dockerfile's path inside the context: relative, normalised, not leaving it."""
    text = (text or "Dockerfile").strip()
    norm = posixpath.normpath(text)
    if text.startswith("/") or norm in (".", "..") or norm.startswith("../") or "\0" in text or "\n" in text:
        raise BuildContextError(text, "the Dockerfile is named by its path inside the context, e.g. Dockerfile "
                                      "or docker/Dockerfile.gpu")
    return norm


def link_stays_inside(links: dict[str, str], path: str, max_hops: int = 40) -> bool:
    """Whether the symlink at ``path`` (relative, normalised) resolves inside the context,
    following the context's other links (``links``: path -> target) the way the kernel would,
    component by component: ``t/../x`` with ``t -> .`` leaves the context though its text
    does not. Pure; a loop or too many hops counts as leaving."""
    hops = 0
    todo = [c for c in posixpath.join(posixpath.dirname(path), links[path]).split("/") if c not in ("", ".")]
    done: list[str] = []
    while todo:
        comp = todo.pop(0)
        if comp == "..":
            if not done:
                return False
            done.pop()
            continue
        here = "/".join(done + [comp])
        if here in links:
            hops += 1
            target = links[here]
            if hops > max_hops or target.startswith("/"):
                return False
            todo = [c for c in target.split("/") if c not in ("", ".")] + todo
            continue
        done.append(comp)
    return True
