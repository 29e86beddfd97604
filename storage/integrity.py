"""Checksums: S3 ETags computed the AWS way, and a per-file cache of them in an xattr.

An object uploaded in one request has the hex MD5 of its bytes as ETag; one uploaded in N
parts has ``md5(md5(part1) + ... + md5(partN)) + "-N"`` (SeaweedFS does the same). So a local
file can be compared with an object by hashing it with the object's part size, and every
transfer is verified by hashing the bytes as they pass (each part's MD5 is also sent as
``Content-MD5``, which the store checks).

Downloads of multipart objects that carry a COMPOSITE CRC32 checksum (every object this layer
uploads in parts does: each part is sent with ``Content-MD5`` and ``x-amz-checksum-crc32``) are
verified with CRC32, about 5x cheaper than MD5: on small machines MD5 is what limits a
download. Other objects are verified against their ETag.

Hashing a large file on every stage-in would cost as much as reading it, so the ETag of a file
this layer wrote or verified is kept in the extended attribute ``user.aiportal.etag`` with the
size and modification time it belongs to; a file that changed has a different mtime and is
hashed again. Filesystems without user xattrs just hash.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import zlib
from dataclasses import dataclass

XATTR = "user.aiportal.etag"
_ETAG_RE = re.compile(r'^"?([0-9a-f]{32})(?:-(\d+))?"?$')
MiB = 1 << 20


@dataclass(frozen=True)
class ETag:
    """A parsed MD5-style ETag: ``md5`` hex and ``parts`` (0 = uploaded in one request)."""

    md5: str
    parts: int = 0

    def __str__(self) -> str:
        return "%s-%d" % (self.md5, self.parts) if self.parts else self.md5


def parse_etag(text: str | None) -> ETag | None:
    """An MD5-style ETag, or None for anything else (e.g. SSE-KMS objects): those can only be
    compared by size."""
    m = _ETAG_RE.match((text or "").strip().lower())
    if not m:
        return None
    return ETag(m.group(1), int(m.group(2)) if m.group(2) else 0)


def multipart_etag(part_md5s: list[bytes]) -> ETag:
    """The ETag of a multipart object from its parts' raw MD5 digests."""
    return ETag(hashlib.md5(b"".join(part_md5s)).hexdigest(), len(part_md5s))


def crc32_b64(value: int) -> str:
    """A CRC32 as S3 writes it: 4 big-endian bytes, base64."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def composite_crc32(part_crcs: list[int]) -> str:
    """The COMPOSITE CRC32 checksum of a multipart object: the CRC32 of the parts' CRC32s,
    ``-N`` (AWS and SeaweedFS)."""
    joined = b"".join(c.to_bytes(4, "big") for c in part_crcs)
    return "%s-%d" % (crc32_b64(zlib.crc32(joined)), len(part_crcs))


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part of a ``size``-byte file cut into ``part_size`` parts."""
    if size == 0:
        return [(0, 0)]
    return [(off, min(part_size, size - off)) for off in range(0, size, part_size)]


def choose_part_size(size: int, default: int = 8 * MiB, max_parts: int = 10000) -> int:
    """``default``, or larger (whole MiB) when the file would need more than ``max_parts``."""
    need = -(-size // max_parts)
    if need <= default:
        return default
    return -(-need // MiB) * MiB


def etag_of_file(path: str | os.PathLike, part_size: int | None, chunk: int = 4 * MiB) -> ETag:
    """The ETag the file would have as an object uploaded in ``part_size`` parts (``None``:
    in one request)."""
    with open(path, "rb", buffering=0) as f:
        if part_size is None:
            h = hashlib.md5()
            while True:
                b = f.read(chunk)
                if not b:
                    return ETag(h.hexdigest())
                h.update(b)
        digests = []
        for _, length in part_ranges(os.fstat(f.fileno()).st_size, part_size):
            h = hashlib.md5()
            left = length
            while left:
                b = f.read(min(chunk, left))
                if not b:
                    raise OSError(errno.EIO, "%s shrank while it was hashed" % path)
                h.update(b)
                left -= len(b)
            digests.append(h.digest())
        return multipart_etag(digests)


def etag_guessing_parts(path: str | os.PathLike, size: int, tag: ETag, preferred: int = 8 * MiB) -> ETag | None:
    """For a store that does not tell an object's part size: try the part sizes common tools use
    (that give ``tag.parts`` parts for ``size`` bytes); the matching ETag, or None."""
    tried = set()
    for ps in (preferred, 8 * MiB, 16 * MiB, 5 * MiB, 15 * MiB, 64 * MiB, -(-size // tag.parts // MiB) * MiB):
        if ps <= 0 or ps in tried or -(-size // ps) != tag.parts:
            continue
        tried.add(ps)
        got = etag_of_file(path, ps)
        if got == tag:
            return got
        if len(tried) == 3:
            break
    return None


def cached_etag(path: str | os.PathLike, st: os.stat_result, parts: int) -> ETag | None:
    """The ETag recorded for this file's current size and mtime with ``parts`` parts, if any."""
    try:
        raw = os.getxattr(path, XATTR, follow_symlinks=False).decode("ascii")
        size, mtime_ns, etag = raw.split(":")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if int(size) != st.st_size or int(mtime_ns) != st.st_mtime_ns:
        return None
    tag = parse_etag(etag)
    return tag if tag is not None and tag.parts == parts else None


def remember_etag(path: str | os.PathLike, st: os.stat_result, etag: ETag) -> None:
    """Record the file's ETag (best effort: read-only files, other owners and filesystems
    without user xattrs are skipped)."""
    try:
        os.setxattr(path, XATTR, ("%d:%d:%s" % (st.st_size, st.st_mtime_ns, etag)).encode("ascii"),
                    follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EROFS, errno.ENOSPC, errno.E2BIG):
            raise
