"""Large files going up in parts: a multipart upload whose parts are tasks of the transfer's
worker pool, each sent with ``Content-MD5`` (and a CRC32 unless the store refuses checksums),
resuming an unfinished upload of the same key from the parts the store already has.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import zlib
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from storage.errors import StagingError
from storage.integrity import ETag, choose_part_size, crc32_b64, multipart_etag, parse_etag, part_ranges, remember_etag
from storage.retry import error_code, http_status
from storage.transfer_pool import Runner

if TYPE_CHECKING:
    from storage.transfer import Transfer

log = logging.getLogger(__name__)


class MultipartUpload:
    """A large file going up in parts, in parallel; resumes an unfinished upload of the key.

    Each part carries ``Content-MD5`` and, unless the store refuses checksums, a CRC32 (the
    object then has a COMPOSITE CRC32 that downloads verify cheaply)."""

    def __init__(self, t: Transfer, runner: Runner, bucket: str, path: str, key: str, st: os.stat_result):
        self.t, self.runner, self.bucket, self.path, self.key, self.st = t, runner, bucket, path, key, st
        self.uri = "s3://%s/%s" % (bucket, key)
        self.part_size = choose_part_size(st.st_size, t.opt.part_size)
        self.ranges = part_ranges(st.st_size, self.part_size)
        self.lock = threading.Lock()
        self.attempt = 0
        self.existing: dict[int, tuple[int, str, str | None]] = {}

    def _usable(self, parts: dict[int, tuple[int, str, str | None]]) -> bool:
        """Whether an unfinished upload can be continued: some parts, all of our layout. (An
        upload another tool started without CRC32 fails to complete; it is then started over.)"""
        return bool(parts) and all(n <= len(self.ranges) and size == self.ranges[n - 1][1]
                                   for n, (size, _, _) in parts.items())

    def _create(self) -> str:
        t = self.t
        if t.crc_uploads:
            try:
                return t.retry(lambda: t.store.create_upload(self.bucket, self.key, crc32=True),
                                "start upload of %s" % self.key)
            except ClientError as e:
                if http_status(e) not in (400, 501) or error_code(e) in ("NoSuchBucket",):
                    raise
                log.info("%s does not take CRC32 checksums (%s); parts are checked with MD5 only",
                         t.store.source.endpoint, error_code(e))
                t.crc_uploads = False
        return t.retry(lambda: t.store.create_upload(self.bucket, self.key), "start upload of %s" % self.key)

    def start(self) -> None:
        t = self.t
        upload_id = None
        for uid, _ in t.retry(lambda: t.store.uploads(self.bucket, self.key), "list uploads of %s" % self.key):
            if upload_id is None:
                parts = t.retry(lambda: t.store.parts(self.bucket, self.key, uid), "list parts of %s" % self.key)
                if self._usable(parts):
                    upload_id, self.existing = uid, parts
                    continue
            t.retry(lambda: t.store.abort_upload(self.bucket, self.key, uid), "abort upload of %s" % self.key)
        if self.existing:
            log.info("%s: resuming an unfinished upload (%d of %d parts already there)",
                     self.uri, len(self.existing), len(self.ranges))
        self._begin(upload_id or self._create())

    def _begin(self, upload_id: str) -> None:
        self.attempt += 1
        self.upload_id = upload_id
        self.crc = self.t.crc_uploads
        self.etags: list[str] = [""] * len(self.ranges)
        self.md5s: list[bytes] = [b""] * len(self.ranges)
        self.crcs: list[str] = [""] * len(self.ranges)
        self.remaining = len(self.ranges)
        for i in range(len(self.ranges)):
            self.runner.submit(self._part, i, self.attempt)

    def _part(self, i: int, attempt: int) -> None:
        t = self.t
        off, length = self.ranges[i]
        with open(self.path, "rb", buffering=0) as fh:
            data = os.pread(fh.fileno(), length, off)
        if len(data) != length:
            raise StagingError(self.path, "changed size while being read; is something still writing it?")
        md5 = hashlib.md5(data)
        want = md5.hexdigest()
        crc = crc32_b64(zlib.crc32(data)) if self.crc else None
        have = self.existing.get(i + 1)
        if (have is not None and have[0] == length and parse_etag(have[1]) == ETag(want)
                and (have[2] is None or have[2] == crc)):
            etag = have[1]
            t.progress.found(length)
        else:
            for n in range(1, t.opt.integrity_attempts + 1):
                def send():
                    t.take(length)
                    return t.store.upload_part(self.bucket, self.key, self.upload_id, i + 1, data, md5.digest(), crc)
                etag = t.send(send, "PUT %s part %d" % (self.key, i + 1))
                if etag is not None and parse_etag(etag) == ETag(want):
                    break
                t.mismatch("%s (part %d)" % (self.uri, i + 1), n, "the store answered ETag %s, expected %s" % (etag, want))
            t.progress.moved(length)
        with self.lock:
            if attempt != self.attempt:
                return
            self.etags[i] = etag
            self.md5s[i] = md5.digest()
            self.crcs[i] = crc or ""
            self.remaining -= 1
            if self.remaining:
                return
        self._complete()

    def _complete(self) -> None:
        t = self.t
        want = multipart_etag(self.md5s)

        def complete():
            try:
                return t.store.complete_upload(self.bucket, self.key, self.upload_id, self.etags,
                                               self.crcs if self.crc else None)
            except ClientError as e:
                # a retried complete whose first try went through: the object is there
                if error_code(e) == "NoSuchUpload":
                    head = t.store.head(self.bucket, self.key)
                    if head is not None and parse_etag(head.etag) == want:
                        return head.etag
                raise
        try:
            got = t.send(complete, "complete upload of %s" % self.key)
        except ClientError as e:
            if not self.existing or http_status(e) != 400:
                raise
            # the resumed upload was not ours to finish this way (e.g. no CRC32): start over
            log.info("%s: cannot complete the resumed upload (%s); uploading it again", self.uri, error_code(e))
            t.retry(lambda: t.store.abort_upload(self.bucket, self.key, self.upload_id), "abort upload of %s" % self.key)
            self.existing = {}
            t.progress.unmoved(self.st.st_size)
            self._begin(self._create())
            return
        if got is None or parse_etag(got) != want:
            t.mismatch(self.uri, self.attempt, "the store answered ETag %s, expected %s" % (got, want))
            self.existing = {}
            t.progress.unmoved(self.st.st_size)
            self._begin(self._create())
            return
        remember_etag(self.path, self.st, want)
        t.file_done(self.st.st_size, copied=True)
