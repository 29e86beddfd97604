"""Downloads of the transfer engine: one object into its local file, in one request or in
ranged GETs that run in parallel with everything else, hashed as the bytes arrive and checked
against the object's COMPOSITE CRC32 or ETag before the file is renamed into place.

``download_file`` is a task for :class:`storage.transfer_pool.Runner`; it queues the ranges of
a large object as more tasks, and the last one to finish verifies and renames the file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from storage.errors import IntegrityError, StagingError
from storage.integrity import (ETag, composite_crc32, etag_guessing_parts, etag_of_file, multipart_etag, parse_etag,
                               part_ranges, remember_etag)
from storage.local import partial_path
from storage.retry import ShortTransfer
from storage.s3 import ObjectInfo
from storage.transfer_plan import newer_than
from storage.transfer_pool import Runner

if TYPE_CHECKING:
    from storage.transfer import Transfer

log = logging.getLogger(__name__)


class Assembly:
    """A download being written part by part into its temporary file."""

    def __init__(self, obj: ObjectInfo, dst: Path, ranges: list[tuple[int, int]], per_part: bool,
                 crc32: str | None = None):
        self.obj = obj
        self.dst = dst
        self.tmp = partial_path(dst)
        self.ranges = ranges
        self.per_part = per_part          #: ranges are the object's upload parts
        self.crc32 = crc32                #: the object's COMPOSITE CRC32: verify with it, not MD5
        self.lock = threading.Lock()
        self.fd = -1
        self.attempt = 0
        self.remaining = 0
        self.digests: list = []

    def open(self) -> None:
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        self.attempt += 1
        self.remaining = len(self.ranges)
        self.digests = [None] * len(self.ranges)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def download_file(t: Transfer, runner: Runner, bucket: str, obj: ObjectInfo, dst: Path) -> None:
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        st = None
    if st is not None and t.identical(bucket, str(dst), st, obj):
        t.file_done(obj.size, copied=False)
        return
    if st is not None and stat.S_ISREG(st.st_mode) and newer_than(st, obj):
        # a checkpoint written after the last stage-out (which then failed): restoring the
        # older object over it would lose work
        log.warning("%s: kept the local file, it is newer than s3://%s/%s", dst, bucket, obj.key)
        with t.lock:
            t.stats.kept_newer += 1
        t.file_done(obj.size, copied=False)
        return
    tag = parse_etag(obj.etag)
    crc = None
    if obj.size <= t.opt.multipart_threshold and (tag is None or tag.parts <= 1):
        ranges, per_part = [(0, obj.size)], True
    else:
        ps = t.part_size_of(bucket, obj, tag) if tag is not None else None
        per_part = ps is not None and tag is not None and tag.parts > 1
        ranges = part_ranges(obj.size, ps if per_part else t.opt.part_size)
        if per_part:
            crc = t.retry(lambda: t.store.checksum_crc32(bucket, obj.key), "checksum of %s" % obj.key)
            if not crc or not crc.endswith("-%d" % len(ranges)):
                crc = None
    asm = Assembly(obj, dst, ranges, per_part, crc)
    with t.lock:
        t.assemblies.add(asm)
    with asm.lock:
        asm.open()
    if len(ranges) == 1:
        _download_range(t, runner, bucket, asm, 0, asm.attempt)
    else:
        for i in range(len(ranges)):
            runner.submit(_download_range, t, runner, bucket, asm, i, asm.attempt)


def _download_range(t: Transfer, runner: Runner, bucket: str, asm: Assembly, i: int, attempt: int) -> None:
    start, length = asm.ranges[i]
    whole = len(asm.ranges) == 1

    use_crc = asm.crc32 is not None

    def fetch():
        h = None if use_crc else hashlib.md5()
        crc = [0]
        pos = [start]

        def sink(b: bytes) -> None:
            if t.abort.is_set():
                raise StagingError(asm.obj.key, "transfer stopped")
            t.take(len(b))
            view = memoryview(b)
            while view:
                n = os.pwrite(asm.fd, view, pos[0])
                view = view[n:]
                pos[0] += n
            if use_crc:
                crc[0] = zlib.crc32(b, crc[0])
            else:
                h.update(b)
            t.progress.moved(len(b))
        try:
            got, etag = t.store.get(bucket, asm.obj.key, sink, None if whole else start,
                                       None if whole else length, t.opt.chunk)
        except BaseException:
            t.progress.unmoved(pos[0] - start)
            raise
        if got != length:
            t.progress.unmoved(got)
            raise ShortTransfer("%s: got %d of %d bytes" % (asm.obj.key, got, length))
        if whole and etag and asm.obj.etag and parse_etag(etag) != parse_etag(asm.obj.etag):
            t.progress.unmoved(got)
            raise ShortTransfer("%s changed while it was read (ETag %s, listed %s)" % (asm.obj.key, etag, asm.obj.etag))
        return crc[0] if use_crc else h.digest()
    digest = t.retry(fetch, "GET %s" % asm.obj.key)
    with asm.lock:
        if attempt != asm.attempt:
            return
        asm.digests[i] = digest
        asm.remaining -= 1
        if asm.remaining:
            return
    _finish_download(t, runner, bucket, asm)


def _finish_download(t: Transfer, runner: Runner, bucket: str, asm: Assembly) -> None:
    obj = asm.obj
    tag = parse_etag(obj.etag)
    size = os.fstat(asm.fd).st_size
    if asm.crc32 is not None:
        got_crc = composite_crc32(asm.digests)
        got = tag if got_crc == asm.crc32 else None        # verified: the bytes are the object's
        bad = got is None
        want = "CRC32 %s" % asm.crc32
        seen = "CRC32 %s" % got_crc
    else:
        if tag is None:
            got = None
        elif tag.parts > 1 and asm.per_part:
            got = multipart_etag(asm.digests)
        elif tag.parts == 0 and len(asm.ranges) == 1:
            got = ETag(asm.digests[0].hex())
        elif tag.parts <= 1:
            got = etag_of_file(asm.tmp, None if tag.parts == 0 else max(obj.size, 1))
        else:
            got = etag_guessing_parts(asm.tmp, obj.size, tag, t.opt.part_size)
            if got is None:
                log.warning("s3://%s/%s: its part layout is unknown (the store does not tell part sizes); "
                            "only its size was checked", bucket, obj.key)
        bad = got is not None and got != tag
        want, seen = "ETag %s" % tag, "%s" % got
    if size != obj.size or bad:
        why = ("size %d, expected %d" % (size, obj.size) if size != obj.size
               else "checksum %s, expected %s" % (seen, want))
        with asm.lock:
            asm.discard()
            if asm.attempt >= t.opt.integrity_attempts:
                raise IntegrityError("s3://%s/%s" % (bucket, obj.key), "downloaded %d times, never intact (%s); "
                                     "the object or the network is corrupting data" % (asm.attempt, why))
            log.warning("s3://%s/%s: %s; downloading it again", bucket, obj.key, why)
            t.progress.unmoved(size)
            asm.open()
            attempt = asm.attempt
        for i in range(len(asm.ranges)):
            runner.submit(_download_range, t, runner, bucket, asm, i, attempt)
        return
    if tag is None and obj.size and asm.crc32 is None:
        log.warning("s3://%s/%s has no MD5 ETag (%r): only its size was checked", bucket, obj.key, obj.etag)
    with asm.lock:
        os.fsync(asm.fd)
        os.close(asm.fd)
        asm.fd = -1
        if got is not None:
            remember_etag(asm.tmp, os.stat(asm.tmp), got)
        try:
            os.replace(asm.tmp, asm.dst)
        except OSError as e:
            asm.discard()
            raise StagingError(str(asm.dst), "cannot put the downloaded file in place: %s" % e.strerror) from e
    with t.lock:
        t.assemblies.discard(asm)
    t.file_done(obj.size, copied=True)
