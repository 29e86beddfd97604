"""Content digests of image sources: what :class:`~containers.cache.SifCache` keys SIFs by.

Digests (``sha256:HEX``): docker-archive, oci-archive and SIF files are hashed whole (1 MiB
reads); an OCI layout uses the manifest digest its index.json gives for the tag; a definition
is its own text plus the contents of the host files it reads (``%files`` sources, resolved
against the definition's directory, directories walked; a ``localimage``/archive ``From:``).
``%files`` sources written with ``{{ ARG }}`` templates are not followed, and what a
definition downloads (debootstrap, pip) is not part of its digest: change the text (a pinned
version) to get a new image. The same image as an archive and as a layout gets two digests.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path

from containers.definition import parse_definition
from containers.errors import ImageRefError
from containers.refs import ImageRef, RefKind

CHUNK = 1 << 20
OCI_REF_NAME = "org.opencontainers.image.ref.name"
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_GLOB_CHARS = frozenset("*?[")


def file_sha256(path: Path) -> str:
    """``sha256:HEX`` of a file's contents, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def manifest_digest(index_json: str, tag: str | None, ref: str) -> str:
    """The manifest digest that an OCI layout's index.json gives for ``tag`` (pure).

    Without a tag the layout must hold exactly one image. Raises :class:`ImageRefError`
    listing the tags there are.
    """
    try:
        manifests = json.loads(index_json).get("manifests") or []
    except (ValueError, AttributeError) as e:
        raise ImageRefError(ref, "index.json is not an OCI image index: %s" % e) from e
    tags = [m.get("annotations", {}).get(OCI_REF_NAME) for m in manifests]
    named = ", ".join(sorted(t for t in tags if t)) or "none"
    if tag is None:
        if len(manifests) != 1:
            raise ImageRefError(ref, "the layout holds %d images; name one as oci:DIR:TAG "
                                     "(tags: %s)" % (len(manifests), named))
        chosen = manifests[0]
    else:
        hits = [m for m, t in zip(manifests, tags) if t == tag]
        if not hits:
            raise ImageRefError(ref, "tag %r is not in the layout (tags: %s)" % (tag, named))
        chosen = hits[0]
    digest = chosen.get("digest", "")
    if not DIGEST_RE.fullmatch(digest):
        raise ImageRefError(ref, "the manifest digest %r is not sha256:HEX" % digest)
    return digest


def source_files(ref: ImageRef) -> list[Path]:
    """The files whose contents make ``ref``'s digest, in a stable order. Raises
    :class:`ImageRefError` naming a missing file, layout or ``%files`` source."""
    path = ref.path
    if ref.kind is RefKind.OCI_LAYOUT:
        if not path.is_dir():
            raise ImageRefError(ref.original, "no OCI layout directory at %s" % path)
        path = path / "index.json"
        if not path.is_file():
            raise ImageRefError(ref.original, "%s has no index.json: not an OCI image "
                                              "layout" % ref.path)
        return [path]
    _require_file(ref, path)
    if ref.kind is not RefKind.DEFINITION:
        return [path]
    try:
        definition = parse_definition(path.read_text(errors="replace"))
    except ValueError as e:
        raise ImageRefError(ref.original, "not an Apptainer definition: %s" % e) from e
    sources = [path]
    local = definition.local_from()
    if local and "{{" not in local:
        base = path.parent / local
        _require_file(ref, base, what="From: file")
        sources.append(base)
    for src in definition.file_sources():
        if "{{" not in src:
            sources += _expand_source(ref, path.parent, src)
    return sources

def compute_digest(ref: ImageRef, sources: list[Path]) -> str:
    """``sha256:HEX`` of ``ref`` from its :func:`source_files` (hashes every file it reads)."""
    if ref.kind is RefKind.OCI_LAYOUT:
        return manifest_digest(sources[0].read_text(), ref.tag, ref.original)
    if len(sources) == 1:
        return file_sha256(sources[0])
    h = hashlib.sha256(b"aiportal-definition-v1\0")
    for src in sources:
        h.update(b"%s\0%s\0" % (os.fsencode(src), file_sha256(src).encode()))
    return "sha256:" + h.hexdigest()


def identity(sources: list[Path]) -> list[list]:
    """What tells that files are unchanged: path, inode, size, mtime_ns and ctime_ns of each."""
    out = []
    for src in sources:
        st = src.stat()
        out.append([str(src), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return out


def _require_file(ref: ImageRef, path: Path, what: str = "file") -> None:
    if not path.exists():
        raise ImageRefError(ref.original, "no such %s: %s" % (what, path))
    if not path.is_file():
        raise ImageRefError(ref.original, "%s is not a regular file" % path)


def _expand_source(ref: ImageRef, base: Path, src: str) -> list[Path]:
    """A ``%files`` source as the files it names: globbed, directories walked, sorted."""
    pattern = base / src
    if _GLOB_CHARS & set(src):
        found = sorted(Path(p) for p in glob.glob(str(pattern)))
        if not found:
            raise ImageRefError(ref.original, "%%files source %s matches nothing" % src)
    elif pattern.exists():
        found = [pattern]
    else:
        raise ImageRefError(ref.original, "%%files source %s does not exist" % pattern)
    out = []
    for path in found:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                out += [Path(dirpath) / f for f in sorted(filenames)
                        if (Path(dirpath) / f).is_file()]
        elif path.is_file():
            out.append(path)
    return out


def digest_hex(digest: str) -> str:
    """HEX of ``sha256:HEX``; ValueError for anything else."""
    m = DIGEST_RE.fullmatch(digest) if isinstance(digest, str) else None
    if not m:
        raise ValueError("digest %r is not sha256: and 64 lowercase hex digits" % (digest,))
    return m.group(1)
