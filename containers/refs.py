"""Image references: the one place where a user's image string becomes a typed value.

:func:`parse_image_ref` is pure (it touches no file and no network). Accepted forms:

============================================  ===============================================
``docker://NAME[:TAG][@sha256:HEX]``           a registry image (Docker reference grammar);
                                               the portal pins it to a digest with the user's
                                               registry account (containers.registry)
``docker-archive:/ABS/PATH.tar``               ``docker save`` / ``skopeo copy ... docker-archive:``
``oci-archive:/ABS/PATH.tar``                  ``skopeo copy ... oci-archive:``
``oci:/ABS/DIR[:TAG]``                         an OCI image layout directory (``umoci``, ``skopeo``)
``/ABS/PATH.sif``                              a SIF file
``/ABS/PATH.def``                              an Apptainer definition file
============================================  ===============================================

Paths must be absolute and normalised and may not contain ``:`` (skopeo and apptainer read
``:`` as the start of a tag), whitespace or control characters.
"""
from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from containers.errors import ImageRefError

MAX_REF_LENGTH = 4096
#: The registry of a docker:// name that names none (Docker's rule).
DEFAULT_REGISTRY = "docker.io"


class RefKind(enum.Enum):
    """Where an image comes from. The value is the reference scheme (or file type)."""

    DOCKER = "docker"                  #: an OCI/Docker registry (containers.registry)
    DOCKER_ARCHIVE = "docker-archive"  #: a tar written by ``docker save`` or skopeo
    OCI_ARCHIVE = "oci-archive"        #: a tar of an OCI image layout
    OCI_LAYOUT = "oci"                 #: an OCI image layout directory, optionally a tag in it
    SIF = "sif"                        #: a ready SIF file
    DEFINITION = "def"                 #: an Apptainer definition file to build


#: Kinds whose location is a path on the (shared) filesystem.
FILE_KINDS = frozenset({RefKind.DOCKER_ARCHIVE, RefKind.OCI_ARCHIVE, RefKind.OCI_LAYOUT,
                        RefKind.SIF, RefKind.DEFINITION})

_SCHEMES = {"docker-archive": RefKind.DOCKER_ARCHIVE, "oci-archive": RefKind.OCI_ARCHIVE,
            "oci": RefKind.OCI_LAYOUT}

_OFFLINE_FIX = ("copy an archive (`skopeo copy ... docker-archive:FILE.tar` or `docker save`) "
                "to the shared filesystem and use docker-archive:/PATH/FILE.tar")

#: Schemes apptainer knows but this site cannot serve, with the reason.
_UNREACHABLE = {
    "library": "the Sylabs library (library://) is not reachable from this site",
    "shub": "Singularity Hub (shub://) is not reachable from this site",
    "oras": "OCI registries (oras://) are not reachable from this site",
    "http": "images are not downloaded over http:// here",
    "https": "images are not downloaded over https:// here",
    "docker-daemon": "there is no Docker daemon on this site",
    "instance": "running instances are not image sources",
}

# The Docker reference grammar (github.com/distribution/reference, grammar in reference.go).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = r"%s(?:%s%s)*" % (_ALNUM, _SEPARATOR, _ALNUM)
_REMOTE_NAME = re.compile(r"%s(?:/%s)*" % (_PATH_COMPONENT, _PATH_COMPONENT))
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(r"(?:%s(?:\.%s)*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
                     % (_DOMAIN_COMPONENT, _DOMAIN_COMPONENT))
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference.

    ``location`` is what follows the scheme, normalised: the docker name (with tag/digest),
    or the absolute path (for ``oci:`` the directory, then ``:TAG`` if one was given).
    ``original`` is the text the user wrote. ``str(ref)`` is the canonical form.
    """

    kind: RefKind
    location: str
    original: str

    def __str__(self) -> str:
        if self.kind is RefKind.DOCKER:
            return "docker://" + self.location
        if self.kind in (RefKind.SIF, RefKind.DEFINITION):
            return self.location
        return "%s:%s" % (self.kind.value, self.location)

    @property
    def path(self) -> Path:
        """The file (or, for ``oci:``, the layout directory) this reference points at."""
        if self.kind is RefKind.DOCKER:
            raise ValueError("%s is a registry reference, not a path" % self)
        return Path(self.location.split(":", 1)[0])

    @property
    def tag(self) -> str | None:
        """The tag inside an OCI layout (``oci:/dir:TAG``) or of a registry image, else None."""
        if self.kind is RefKind.OCI_LAYOUT and ":" in self.location:
            return self.location.split(":", 1)[1]
        if self.kind is RefKind.DOCKER:
            return _split_docker(self.location)[2]
        return None

    # -- registry images (docker://) -------------------------------------------------------

    def _docker(self) -> tuple[str, str, str | None, str | None]:
        if self.kind is not RefKind.DOCKER:
            raise ValueError("%s is not a registry reference" % self)
        return _split_docker(self.location)

    @property
    def registry(self) -> str:
        """The registry host (``HOST[:PORT]``); ``docker.io`` when the name has none."""
        return self._docker()[0] or DEFAULT_REGISTRY

    @property
    def repository(self) -> str:
        """The repository inside the registry (``library/NAME`` for Docker Hub's one-part names)."""
        domain, remote, _, _ = self._docker()
        if not domain and "/" not in remote:
            return "library/" + remote
        return remote

    @property
    def digest(self) -> str | None:
        """``sha256:HEX`` when the reference is pinned (``NAME@sha256:...``), else None."""
        return self._docker()[3]

    @property
    def reference(self) -> str:
        """What the registry's manifest endpoint is asked for: the digest, else the tag
        (``latest`` when none is given)."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> "ImageRef":
        """``docker://HOST/REPO@DIGEST``: this image at one content digest, whatever its tag
        points at later. The host is always written out."""
        if not _DIGEST.fullmatch(digest or ""):
            raise ValueError("not a sha256 digest: %r" % digest)
        location = "%s/%s@%s" % (self.registry, self.repository, digest)
        return ImageRef(RefKind.DOCKER, location, "docker://" + location)


def parse_image_ref(text: str) -> ImageRef:
    """Parse a user's image reference; raise :class:`ImageRefError` naming what is wrong.

    Pure: no file is looked at (whether the path exists is the cache's business).
    """
    if not isinstance(text, str):
        raise ImageRefError(repr(text), "an image reference is a string")
    if not text:
        raise ImageRefError(text, "the image reference is empty")
    if len(text) > MAX_REF_LENGTH:
        raise ImageRefError(text[:80] + "...", "longer than %d characters" % MAX_REF_LENGTH)
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ImageRefError(text, "contains whitespace or control characters")

    if text.startswith("/"):
        return _parse_file(text)

    scheme, sep, rest = text.partition(":")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        if scheme == "docker":
            if not rest.startswith("//"):
                raise ImageRefError(text, "a registry image is written docker://NAME[:TAG]")
            return ImageRef(RefKind.DOCKER, _check_docker_name(text, rest[2:]), text)
        if scheme in _SCHEMES:
            return _parse_schemed(text, _SCHEMES[scheme], rest)
        if scheme.lower() in _UNREACHABLE:
            raise ImageRefError(text, "%s; %s" % (_UNREACHABLE[scheme.lower()], _OFFLINE_FIX))
        if rest.startswith("//"):
            raise ImageRefError(text, "unknown or unsupported scheme %r: not reachable from "
                                      "this site" % (scheme + "://"))
    if not re.search(r"\.(sif|def|tar)$", text) and _looks_like_docker_name(text):
        raise ImageRefError(text, "no scheme: did you mean docker://%s or an absolute path?" % text)
    raise ImageRefError(text, "relative paths and unknown schemes are not accepted; "
                              "give an absolute path")


def _parse_file(text: str) -> ImageRef:
    path = _check_path(text, text)
    if path.endswith(".sif"):
        return ImageRef(RefKind.SIF, path, text)
    if path.endswith(".def"):
        return ImageRef(RefKind.DEFINITION, path, text)
    raise ImageRefError(text, "a bare path must end in .sif (an image) or .def (a definition); "
                              "write archives as docker-archive:PATH or oci-archive:PATH")


def _parse_schemed(text: str, kind: RefKind, rest: str) -> ImageRef:
    if kind is RefKind.OCI_LAYOUT:
        directory, sep, tag = rest.partition(":")
        directory = _check_path(text, directory)
        if sep:
            if not _TAG.fullmatch(tag):
                raise ImageRefError(text, "tag %r is not valid (letters, digits, _ . -; at most "
                                          "128; not starting with . or -)" % tag)
            return ImageRef(kind, "%s:%s" % (directory, tag), text)
        return ImageRef(kind, directory, text)
    return ImageRef(kind, _check_path(text, rest), text)


def _check_path(text: str, path: str) -> str:
    if not path:
        raise ImageRefError(text, "the path is empty")
    if not path.startswith("/"):
        raise ImageRefError(text, "relative path %r: give an absolute path" % path)
    if ":" in path:
        raise ImageRefError(text, "':' is not allowed in paths (it starts a tag); rename the file")
    trimmed = path.rstrip("/") or "/"
    if "//" in path or posixpath.normpath(path) != trimmed:
        raise ImageRefError(text, "the path is not normalised (no '.', '..' or '//'); use %r"
                                  % posixpath.normpath(path))
    return trimmed


def _split_docker(name: str) -> tuple[str, str, str | None, str | None]:
    """``name`` -> (domain, remote name, tag, digest); None where absent ("" where empty)."""
    digest = None
    if "@" in name:
        name, digest = name.split("@", 1)
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    domain = ""
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, name = first, remainder
    return domain, name, tag, digest


def _check_docker_name(text: str, name: str) -> str:
    if not name:
        raise ImageRefError(text, "the docker image name is empty")
    domain, remote, tag, digest = _split_docker(name)
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise ImageRefError(text, "digest %r is not valid (sha256: and 64 lowercase hex digits)"
                                  % digest)
    if tag is not None and not _TAG.fullmatch(tag):
        raise ImageRefError(text, "tag %r is not valid (letters, digits, _ . -; at most 128; "
                                  "not starting with . or -)" % tag)
    if domain and not _DOMAIN.fullmatch(domain):
        raise ImageRefError(text, "registry host %r is not valid" % domain)
    if not _REMOTE_NAME.fullmatch(remote):
        if _REMOTE_NAME.fullmatch(remote.lower()):
            raise ImageRefError(text, "repository name %r must be lowercase" % remote)
        raise ImageRefError(text, "%r is not a valid docker repository name (lowercase letters "
                                  "and digits, separated by . _ - and /)" % remote)
    if len(domain) + len(remote) + (1 if domain else 0) > _MAX_NAME:
        raise ImageRefError(text, "the repository name is longer than %d characters" % _MAX_NAME)
    return name


def _looks_like_docker_name(text: str) -> bool:
    try:
        _check_docker_name(text, text)
    except ImageRefError:
        return False
    return True


def absolute_ref(text: str, cwd: str) -> str:
    """``text`` with a relative path made absolute against ``cwd`` (the caller's folder, for the
    command line): ``containers/x.def``, ``./x.sif``, ``docker-archive:img.tar``,
    ``oci:layout:TAG``. Other text comes back as it is, for :func:`parse_image_ref` to judge.
    Pure: no file is looked at."""
    if not isinstance(text, str) or not text or text.startswith("/"):
        return text
    scheme, sep, rest = text.partition(":")
    if sep and scheme in _SCHEMES:
        if not rest or rest.startswith("/"):
            return text
        return "%s:%s" % (scheme, _join(cwd, rest))
    if not sep and re.search(r"\.(sif|def)$", text):
        return _join(cwd, text)
    return text


def _join(cwd: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(cwd, path))
