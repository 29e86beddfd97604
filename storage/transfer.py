"""The transfer engine: a directory tree between S3 and a local (shared or scratch) directory.

1. **Plan** (main thread): list the prefix (or walk the tree), map keys <-> relative paths
   (refusing any that would leave the destination), create directories.
2. **Run**: one thread pool of ``workers`` threads; a task is one small file, one part of a
   large file, or one check. So at most ``workers`` requests are in flight, whatever the mix,
   and large files are cut into parts (multipart upload, ranged GETs) that run in parallel
   with everything else. Large files are queued first.
3. **Skip** files that are already identical: same size and same ETag (the local ETag comes
   from the xattr cache or is hashed with the object's part size).
4. **Verify** every transfer: each part's MD5 is sent as ``Content-MD5`` (the store checks it)
   and compared with the ETag returned; downloads are hashed as they arrive and compared with
   the object's ETag. A mismatch is retried ``integrity_attempts`` times, then fails loudly.
5. **Atomic**: downloads are written to ``.NAME.HOST.PID.RAND.aiportal-partial`` and renamed
   into place once verified; an interrupted multipart upload is resumed from the parts the
   store already has (their MD5 must match), other uploads of the key are aborted.
6. **Retries** with backoff for transient errors (:mod:`storage.retry`); when one request runs
   out of retries the whole transfer stops (nothing new starts; waits end) and fails.
7. **Bandwidth**: an optional token bucket shared by all workers; **progress** lines every
   ``progress_every`` seconds.

Modules: this one (options, the engine, small uploads), :mod:`storage.transfer_plan` (listings
and local trees into work, pure), :mod:`storage.transfer_pool` (the worker pool),
:mod:`storage.transfer_download` (objects into files, verified), :mod:`storage.transfer_upload`
(multipart uploads, resumable).
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from botocore.exceptions import ClientError

from storage.errors import IntegrityError, LocationError, StagingError, StorageError
from storage.integrity import ETag, cached_etag, etag_guessing_parts, etag_of_file, parse_etag, remember_etag
from storage.local import CopyStats
from storage.progress import Progress, human_bytes
from storage.retry import RetryPolicy, error_code
from storage.s3 import ObjectInfo, S3Store, translate
from storage.throttle import TokenBucket
from storage.transfer_download import Assembly, download_file
from storage.transfer_plan import LocalFile, make_dirs, plan_download, scan_local
from storage.transfer_pool import Runner
from storage.transfer_upload import MultipartUpload
from storage.uris import DataLocation

log = logging.getLogger(__name__)
MiB = 1 << 20


@dataclass(frozen=True)
class TransferOptions:
    workers: int = 8
    part_size: int = 8 * MiB
    multipart_threshold: int = 16 * MiB
    bandwidth_mbps: float | None = None          #: megabits per second for the whole transfer
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    integrity_attempts: int = 3
    progress_every: float = 5.0
    chunk: int = 1 * MiB

    def __post_init__(self):
        if not 1 <= self.workers <= 64:
            raise ValueError("workers must be 1-64")
        if self.part_size < 5 * MiB or self.multipart_threshold < self.part_size:
            raise ValueError("part_size must be >= 5 MiB (S3's minimum) and <= multipart_threshold")


class Transfer:
    """One stage-in or stage-out between ``store`` and a local directory."""

    def __init__(self, store: S3Store, options: TransferOptions, label: str,
                 emit: Callable[[str], object] | None = None):
        self.store = store
        self.opt = options
        self.stats = CopyStats()
        self.abort = threading.Event()
        self.limiter = TokenBucket.from_mbps(options.bandwidth_mbps, burst=None) if options.bandwidth_mbps else None
        if self.limiter is not None:
            self.limiter.burst = max(self.limiter.burst, float(options.chunk))
        self.progress = Progress(label, emit or log.info, options.progress_every)
        self.lock = threading.Lock()
        self.assemblies: set[Assembly] = set()
        self.crc_uploads = True          #: send CRC32 checksums with parts (off if the store refuses them)
        self._part_sizes: dict[str, int | None] = {}

    # -- shared helpers --------------------------------------------------------------------

    def retry(self, fn: Callable, what: str):
        return self.opt.retry.call(fn, what, abort=self.abort, on_retry=self._count_retry)

    def _count_retry(self, e, attempt, wait) -> None:
        with self.lock:
            self.stats.retries += 1

    def take(self, n: int) -> None:
        if self.limiter is not None and n:
            wait = self.limiter.reserve(n)
            if wait > 0:
                self.abort.wait(wait)

    def file_done(self, size: int, copied: bool) -> None:
        with self.lock:
            if copied:
                self.stats.copied += 1
                self.stats.bytes_copied += size
            else:
                self.stats.skipped += 1
        self.progress.file_done(0 if copied else size)

    def part_size_of(self, bucket: str, obj: ObjectInfo, tag: ETag) -> int | None:
        """The part size an object was uploaded with (None: one request). Asks the store for
        part 1's size; a layout that is not "equal parts, smaller last" gives None too."""
        if tag.parts == 0:
            return None
        if tag.parts == 1:
            return max(obj.size, 1)
        if obj.key not in self._part_sizes:
            first = self.retry(lambda: self.store.head(bucket, obj.key, part_number=1), "size of part 1 of %s" % obj.key)
            ps = first.size if first is not None else 0
            ok = ps > 0 and (tag.parts - 1) * ps < obj.size <= tag.parts * ps
            self._part_sizes[obj.key] = ps if ok else None
        return self._part_sizes[obj.key]

    def identical(self, bucket: str, path: str, st: os.stat_result, obj: ObjectInfo,
                   data: bytes | None = None) -> bool:
        """Whether the local file holds exactly the object's bytes (size, then ETag)."""
        if not stat.S_ISREG(st.st_mode) or st.st_size != obj.size:
            return False
        tag = parse_etag(obj.etag)
        if tag is None:
            return False                       # not an MD5 ETag: cannot tell, transfer again
        cached = cached_etag(path, st, tag.parts)
        if cached is not None:
            return cached == tag
        if data is not None and tag.parts == 0:
            local = ETag(hashlib.md5(data).hexdigest())
        else:
            ps = self.part_size_of(bucket, obj, tag)
            if tag.parts and ps is None:
                local = etag_guessing_parts(path, st.st_size, tag, self.opt.part_size)
                if local is None:
                    return False
            else:
                local = etag_of_file(path, ps)
        remember_etag(path, st, local)
        return local == tag

    def _start(self, files: int, nbytes: int) -> None:
        self.stats.files = files
        self.progress.set_totals(files, nbytes)
        self.progress.emit("%s: %d files, %s (%d workers, %s)" % (
            self.progress.label, files, human_bytes(nbytes), self.opt.workers,
            "at most %g Mbit/s" % self.opt.bandwidth_mbps if self.opt.bandwidth_mbps else "no bandwidth cap"))

    def cleanup(self) -> None:
        """Remove temporary files of downloads that did not finish."""
        with self.lock:
            left = list(self.assemblies)
            self.assemblies.clear()
        for a in left:
            with a.lock:
                a.discard()

    # -- download ----------------------------------------------------------------------------

    def download(self, loc: DataLocation, dest_dir: Path, missing_ok: bool = False) -> CopyStats:
        t0 = time.monotonic()
        bucket, prefix = loc.bucket, loc.key
        try:
            objects = self.retry(lambda: list(self.store.list(bucket, prefix + "/" if prefix else "")),
                                  "list %s" % loc.uri)
            single = None
            if not objects and prefix:
                single = self.retry(lambda: self.store.head(bucket, prefix), "look up %s" % loc.uri)
            if single is not None:
                plan = [(single, dest_dir / prefix.rsplit("/", 1)[-1])]
                dirs: list[Path] = []
            elif not objects:
                if missing_ok:
                    log.info("%s has no objects yet: nothing to restore", loc.uri)
                    dest_dir.mkdir(parents=True, exist_ok=True)
                    return self.stats
                raise LocationError(loc.uri, "no objects under this prefix (check the bucket and prefix)")
            else:
                plan, dirs = plan_download(loc, objects, dest_dir)
            make_dirs(dest_dir, dirs + sorted({p.parent for _, p in plan}))
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, loc.uri, self.store.source, self.opt.retry.attempts) from e
        self._start(len(plan), sum(o.size for o, _ in plan))
        runner = Runner(self.opt.workers, self.abort)
        for obj, dst in sorted(plan, key=lambda p: -p[0].size):
            runner.submit(download_file, self, runner, bucket, obj, dst)
        self._finish(runner, loc.uri)
        self.stats.seconds = time.monotonic() - t0
        return self.stats


    # -- upload ------------------------------------------------------------------------------

    def upload(self, src: Path, loc: DataLocation) -> CopyStats:
        t0 = time.monotonic()
        bucket, prefix = loc.bucket, loc.key
        if not src.exists():
            raise StagingError(str(src), "does not exist (check the path and that this user can read it)")
        try:
            files, empty_dirs = scan_local(src, loc)
            if src.is_file():
                remote = {}
                head = self.retry(lambda: self.store.head(bucket, files[0][1]), "look up %s" % files[0][1])
                if head is not None:
                    remote[head.key] = head
            else:
                remote = self.retry(lambda: {o.key: o for o in self.store.list(bucket, prefix + "/" if prefix else "")},
                                     "list %s" % loc.uri)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, loc.uri, self.store.source, self.opt.retry.attempts) from e
        self._start(len(files), sum(f.size for f, _ in files))
        runner = Runner(self.opt.workers, self.abort)
        for f, key in sorted(files, key=lambda p: -p[0].size):
            runner.submit(self._upload_file, runner, bucket, f, key, remote.get(key))
        for key in empty_dirs:
            if key not in remote:
                runner.submit(self._put_marker, bucket, key)
        self._finish(runner, loc.uri)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _put_marker(self, bucket: str, key: str) -> None:
        self.retry(lambda: self.store.put(bucket, key, b"", hashlib.md5(b"").digest()), "PUT %s" % key)

    def _upload_file(self, runner: Runner, bucket: str, f: LocalFile, key: str, remote: ObjectInfo | None) -> None:
        st = os.stat(f.path)
        uri = "s3://%s/%s" % (bucket, key)
        if st.st_size <= self.opt.multipart_threshold:
            with open(f.path, "rb") as fh:
                data = fh.read()
            if len(data) != st.st_size:
                raise StagingError(f.path, "changed size while being read; is something still writing it?")
            if remote is not None and self.identical(bucket, f.path, st, remote, data):
                self.file_done(st.st_size, copied=False)
                return
            md5 = hashlib.md5(data)
            want = ETag(md5.hexdigest())
            for attempt in range(1, self.opt.integrity_attempts + 1):
                def send():
                    self.take(len(data))
                    return self.store.put(bucket, key, data, md5.digest())
                got = self.send(send, "PUT %s" % key)
                if got is not None and parse_etag(got) == want:
                    break
                self.mismatch(uri, attempt, "the store answered ETag %s, expected %s" % (got, want))
            remember_etag(f.path, st, want)
            self.progress.moved(st.st_size)
            self.file_done(st.st_size, copied=True)
            return
        if remote is not None and self.identical(bucket, f.path, st, remote):
            self.file_done(st.st_size, copied=False)
            return
        MultipartUpload(self, runner, bucket, f.path, key, st).start()

    def send(self, fn: Callable, what: str):
        """One request with retries; a BadDigest answer (the store saw other bytes than we
        hashed) comes back as None, for the integrity loop."""
        try:
            return self.retry(fn, what)
        except ClientError as e:
            if error_code(e) in ("BadDigest", "InvalidDigest"):
                return None
            raise

    def mismatch(self, uri: str, attempt: int, why: str) -> None:
        if attempt >= self.opt.integrity_attempts:
            raise IntegrityError(uri, "sent %d times, never stored intact (%s)" % (attempt, why))
        log.warning("%s: %s; sending it again", uri, why)

    def _finish(self, runner: Runner, uri: str) -> None:
        try:
            runner.wait()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, uri, self.store.source, self.opt.retry.attempts) from e
        finally:
            self.cleanup()
