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
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from botocore.exceptions import ClientError

from storage.credentials import DataSource
from storage.errors import IntegrityError, LocationError, StagingError, StorageError
from storage.integrity import (ETag, cached_etag, choose_part_size, composite_crc32, crc32_b64, etag_guessing_parts,
                               etag_of_file, multipart_etag, parse_etag, part_ranges, remember_etag)
from storage.local import CopyStats, PARTIAL_SUFFIX, partial_path
from storage.progress import Progress, human_bytes
from storage.retry import RetryPolicy, ShortTransfer, error_code, http_status
from storage.s3 import ObjectInfo, S3Store, translate
from storage.throttle import TokenBucket
from storage.uris import DataLocation, key_for_rel_path, rel_path_for_key

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


@dataclass(frozen=True)
class LocalFile:
    rel: str          #: relative path with '/' separators
    path: str
    size: int


class _Runner:
    """A thread pool whose tasks may queue more tasks; the first failure stops the rest."""

    def __init__(self, workers: int, abort: threading.Event):
        self.abort = abort
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="aiportal-stage")
        self._cv = threading.Condition()
        self._pending = 0
        self.error: BaseException | None = None

    def submit(self, fn: Callable, *args) -> None:
        with self._cv:
            self._pending += 1
        self._pool.submit(self._run, fn, args)

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            if not self.abort.is_set():
                fn(*args)
        except BaseException as e:  # noqa: BLE001 - recorded, re-raised by wait()
            with self._cv:
                if self.error is None:
                    self.error = e
            self.abort.set()
        finally:
            with self._cv:
                self._pending -= 1
                if self._pending == 0:
                    self._cv.notify_all()

    def wait(self) -> None:
        try:
            with self._cv:
                while self._pending:
                    self._cv.wait(0.5)
        except BaseException:
            self.abort.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            raise
        self._pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error


class _Assembly:
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
        self._lock = threading.Lock()
        self._assemblies: set[_Assembly] = set()
        self.crc_uploads = True          #: send CRC32 checksums with parts (off if the store refuses them)
        self._part_sizes: dict[str, int | None] = {}

    # -- shared helpers --------------------------------------------------------------------

    def _retry(self, fn: Callable, what: str):
        return self.opt.retry.call(fn, what, abort=self.abort, on_retry=self._count_retry)

    def _count_retry(self, e, attempt, wait) -> None:
        with self._lock:
            self.stats.retries += 1

    def _take(self, n: int) -> None:
        if self.limiter is not None and n:
            wait = self.limiter.reserve(n)
            if wait > 0:
                self.abort.wait(wait)

    def _done(self, size: int, copied: bool) -> None:
        with self._lock:
            if copied:
                self.stats.copied += 1
                self.stats.bytes_copied += size
            else:
                self.stats.skipped += 1
        self.progress.file_done(0 if copied else size)

    def _part_size_of(self, bucket: str, obj: ObjectInfo, tag: ETag) -> int | None:
        """The part size an object was uploaded with (None: one request). Asks the store for
        part 1's size; a layout that is not "equal parts, smaller last" gives None too."""
        if tag.parts == 0:
            return None
        if tag.parts == 1:
            return max(obj.size, 1)
        if obj.key not in self._part_sizes:
            first = self._retry(lambda: self.store.head(bucket, obj.key, part_number=1), "size of part 1 of %s" % obj.key)
            ps = first.size if first is not None else 0
            ok = ps > 0 and (tag.parts - 1) * ps < obj.size <= tag.parts * ps
            self._part_sizes[obj.key] = ps if ok else None
        return self._part_sizes[obj.key]

    def _identical(self, bucket: str, path: str, st: os.stat_result, obj: ObjectInfo,
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
            ps = self._part_size_of(bucket, obj, tag)
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
        with self._lock:
            left = list(self._assemblies)
            self._assemblies.clear()
        for a in left:
            with a.lock:
                a.discard()

    # -- download ----------------------------------------------------------------------------

    def download(self, loc: DataLocation, dest_dir: Path, missing_ok: bool = False) -> CopyStats:
        t0 = time.monotonic()
        bucket, prefix = loc.bucket, loc.key
        try:
            objects = self._retry(lambda: list(self.store.list(bucket, prefix + "/" if prefix else "")),
                                  "list %s" % loc.uri)
            single = None
            if not objects and prefix:
                single = self._retry(lambda: self.store.head(bucket, prefix), "look up %s" % loc.uri)
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
                plan, dirs = self._plan_download(loc, objects, dest_dir)
            self._make_dirs(dest_dir, dirs + sorted({p.parent for _, p in plan}))
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, loc.uri, self.store.source, self.opt.retry.attempts) from e
        self._start(len(plan), sum(o.size for o, _ in plan))
        runner = _Runner(self.opt.workers, self.abort)
        for obj, dst in sorted(plan, key=lambda p: -p[0].size):
            runner.submit(self._download_file, runner, bucket, obj, dst)
        self._finish(runner, loc.uri)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _plan_download(self, loc: DataLocation, objects: list[ObjectInfo],
                       dest_dir: Path) -> tuple[list[tuple[ObjectInfo, Path]], list[Path]]:
        prefix = loc.key
        plan, dirs, files = [], [], set()
        for o in objects:
            rel = rel_path_for_key(prefix, o.key, loc.uri)
            if not rel:
                continue                      # the prefix's own directory marker
            if rel.endswith("/"):
                dirs.append(dest_dir / rel[:-1])
                continue
            plan.append((o, dest_dir / rel))
            files.add(rel)
        for rel in files:
            parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
            while parent:
                if parent in files:
                    raise LocationError(loc.uri, "%r is both a file and a directory in the bucket; rename one"
                                                 % parent)
                parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
        return plan, dirs

    @staticmethod
    def _make_dirs(root: Path, dirs: list[Path]) -> None:
        """Create directories below ``root``, refusing to go through a symlink."""
        root.mkdir(parents=True, exist_ok=True)
        seen: set[Path] = {root}
        for d in dirs:
            chain = []
            p = d
            while p not in seen and p != root:
                chain.append(p)
                p = p.parent
            for p in reversed(chain):
                try:
                    os.mkdir(p)
                except FileExistsError:
                    if os.path.islink(p) or not p.is_dir():
                        raise LocationError(str(p), "exists and is not a directory (or is a symlink); "
                                                    "staging does not write through it") from None
                seen.add(p)

    def _download_file(self, runner: _Runner, bucket: str, obj: ObjectInfo, dst: Path) -> None:
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            st = None
        if st is not None and self._identical(bucket, str(dst), st, obj):
            self._done(obj.size, copied=False)
            return
        if st is not None and stat.S_ISREG(st.st_mode) and _newer_than(st, obj):
            # a checkpoint written after the last stage-out (which then failed): restoring the
            # older object over it would lose work
            log.warning("%s: kept the local file, it is newer than s3://%s/%s", dst, bucket, obj.key)
            with self._lock:
                self.stats.kept_newer += 1
            self._done(obj.size, copied=False)
            return
        tag = parse_etag(obj.etag)
        crc = None
        if obj.size <= self.opt.multipart_threshold and (tag is None or tag.parts <= 1):
            ranges, per_part = [(0, obj.size)], True
        else:
            ps = self._part_size_of(bucket, obj, tag) if tag is not None else None
            per_part = ps is not None and tag is not None and tag.parts > 1
            ranges = part_ranges(obj.size, ps if per_part else self.opt.part_size)
            if per_part:
                crc = self._retry(lambda: self.store.checksum_crc32(bucket, obj.key), "checksum of %s" % obj.key)
                if not crc or not crc.endswith("-%d" % len(ranges)):
                    crc = None
        asm = _Assembly(obj, dst, ranges, per_part, crc)
        with self._lock:
            self._assemblies.add(asm)
        with asm.lock:
            asm.open()
        if len(ranges) == 1:
            self._download_range(runner, bucket, asm, 0, asm.attempt)
        else:
            for i in range(len(ranges)):
                runner.submit(self._download_range, runner, bucket, asm, i, asm.attempt)

    def _download_range(self, runner: _Runner, bucket: str, asm: _Assembly, i: int, attempt: int) -> None:
        start, length = asm.ranges[i]
        whole = len(asm.ranges) == 1

        use_crc = asm.crc32 is not None

        def fetch():
            h = None if use_crc else hashlib.md5()
            crc = [0]
            pos = [start]

            def sink(b: bytes) -> None:
                if self.abort.is_set():
                    raise StagingError(asm.obj.key, "transfer stopped")
                self._take(len(b))
                view = memoryview(b)
                while view:
                    n = os.pwrite(asm.fd, view, pos[0])
                    view = view[n:]
                    pos[0] += n
                if use_crc:
                    crc[0] = zlib.crc32(b, crc[0])
                else:
                    h.update(b)
                self.progress.moved(len(b))
            try:
                got, etag = self.store.get(bucket, asm.obj.key, sink, None if whole else start,
                                           None if whole else length, self.opt.chunk)
            except BaseException:
                self.progress.unmoved(pos[0] - start)
                raise
            if got != length:
                self.progress.unmoved(got)
                raise ShortTransfer("%s: got %d of %d bytes" % (asm.obj.key, got, length))
            if whole and etag and asm.obj.etag and parse_etag(etag) != parse_etag(asm.obj.etag):
                self.progress.unmoved(got)
                raise ShortTransfer("%s changed while it was read (ETag %s, listed %s)" % (asm.obj.key, etag, asm.obj.etag))
            return crc[0] if use_crc else h.digest()
        digest = self._retry(fetch, "GET %s" % asm.obj.key)
        with asm.lock:
            if attempt != asm.attempt:
                return
            asm.digests[i] = digest
            asm.remaining -= 1
            if asm.remaining:
                return
        self._finish_download(runner, bucket, asm)

    def _finish_download(self, runner: _Runner, bucket: str, asm: _Assembly) -> None:
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
                got = etag_guessing_parts(asm.tmp, obj.size, tag, self.opt.part_size)
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
                if asm.attempt >= self.opt.integrity_attempts:
                    raise IntegrityError("s3://%s/%s" % (bucket, obj.key), "downloaded %d times, never intact (%s); "
                                         "the object or the network is corrupting data" % (asm.attempt, why))
                log.warning("s3://%s/%s: %s; downloading it again", bucket, obj.key, why)
                self.progress.unmoved(size)
                asm.open()
                attempt = asm.attempt
            for i in range(len(asm.ranges)):
                runner.submit(self._download_range, runner, bucket, asm, i, attempt)
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
        with self._lock:
            self._assemblies.discard(asm)
        self._done(obj.size, copied=True)

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
                head = self._retry(lambda: self.store.head(bucket, files[0][1]), "look up %s" % files[0][1])
                if head is not None:
                    remote[head.key] = head
            else:
                remote = self._retry(lambda: {o.key: o for o in self.store.list(bucket, prefix + "/" if prefix else "")},
                                     "list %s" % loc.uri)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, loc.uri, self.store.source, self.opt.retry.attempts) from e
        self._start(len(files), sum(f.size for f, _ in files))
        runner = _Runner(self.opt.workers, self.abort)
        for f, key in sorted(files, key=lambda p: -p[0].size):
            runner.submit(self._upload_file, runner, bucket, f, key, remote.get(key))
        for key in empty_dirs:
            if key not in remote:
                runner.submit(self._put_marker, bucket, key)
        self._finish(runner, loc.uri)
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def _put_marker(self, bucket: str, key: str) -> None:
        self._retry(lambda: self.store.put(bucket, key, b"", hashlib.md5(b"").digest()), "PUT %s" % key)

    def _upload_file(self, runner: _Runner, bucket: str, f: LocalFile, key: str, remote: ObjectInfo | None) -> None:
        st = os.stat(f.path)
        uri = "s3://%s/%s" % (bucket, key)
        if st.st_size <= self.opt.multipart_threshold:
            with open(f.path, "rb") as fh:
                data = fh.read()
            if len(data) != st.st_size:
                raise StagingError(f.path, "changed size while being read; is something still writing it?")
            if remote is not None and self._identical(bucket, f.path, st, remote, data):
                self._done(st.st_size, copied=False)
                return
            md5 = hashlib.md5(data)
            want = ETag(md5.hexdigest())
            for attempt in range(1, self.opt.integrity_attempts + 1):
                def send():
                    self._take(len(data))
                    return self.store.put(bucket, key, data, md5.digest())
                got = self._send(send, "PUT %s" % key)
                if got is not None and parse_etag(got) == want:
                    break
                self._mismatch(uri, attempt, "the store answered ETag %s, expected %s" % (got, want))
            remember_etag(f.path, st, want)
            self.progress.moved(st.st_size)
            self._done(st.st_size, copied=True)
            return
        if remote is not None and self._identical(bucket, f.path, st, remote):
            self._done(st.st_size, copied=False)
            return
        _MultipartUpload(self, runner, bucket, f.path, key, st).start()

    def _send(self, fn: Callable, what: str):
        """One request with retries; a BadDigest answer (the store saw other bytes than we
        hashed) comes back as None, for the integrity loop."""
        try:
            return self._retry(fn, what)
        except ClientError as e:
            if error_code(e) in ("BadDigest", "InvalidDigest"):
                return None
            raise

    def _mismatch(self, uri: str, attempt: int, why: str) -> None:
        if attempt >= self.opt.integrity_attempts:
            raise IntegrityError(uri, "sent %d times, never stored intact (%s)" % (attempt, why))
        log.warning("%s: %s; sending it again", uri, why)

    def _finish(self, runner: _Runner, uri: str) -> None:
        try:
            runner.wait()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, uri, self.store.source, self.opt.retry.attempts) from e
        finally:
            self.cleanup()


class _MultipartUpload:
    """A large file going up in parts, in parallel; resumes an unfinished upload of the key.

    Each part carries ``Content-MD5`` and, unless the store refuses checksums, a CRC32 (the
    object then has a COMPOSITE CRC32 that downloads verify cheaply)."""

    def __init__(self, t: Transfer, runner: _Runner, bucket: str, path: str, key: str, st: os.stat_result):
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
                return t._retry(lambda: t.store.create_upload(self.bucket, self.key, crc32=True),
                                "start upload of %s" % self.key)
            except ClientError as e:
                if http_status(e) not in (400, 501) or error_code(e) in ("NoSuchBucket",):
                    raise
                log.info("%s does not take CRC32 checksums (%s); parts are checked with MD5 only",
                         t.store.source.endpoint, error_code(e))
                t.crc_uploads = False
        return t._retry(lambda: t.store.create_upload(self.bucket, self.key), "start upload of %s" % self.key)

    def start(self) -> None:
        t = self.t
        upload_id = None
        for uid, _ in t._retry(lambda: t.store.uploads(self.bucket, self.key), "list uploads of %s" % self.key):
            if upload_id is None:
                parts = t._retry(lambda: t.store.parts(self.bucket, self.key, uid), "list parts of %s" % self.key)
                if self._usable(parts):
                    upload_id, self.existing = uid, parts
                    continue
            t._retry(lambda: t.store.abort_upload(self.bucket, self.key, uid), "abort upload of %s" % self.key)
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
                    t._take(length)
                    return t.store.upload_part(self.bucket, self.key, self.upload_id, i + 1, data, md5.digest(), crc)
                etag = t._send(send, "PUT %s part %d" % (self.key, i + 1))
                if etag is not None and parse_etag(etag) == ETag(want):
                    break
                t._mismatch("%s (part %d)" % (self.uri, i + 1), n, "the store answered ETag %s, expected %s" % (etag, want))
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
            got = t._send(complete, "complete upload of %s" % self.key)
        except ClientError as e:
            if not self.existing or http_status(e) != 400:
                raise
            # the resumed upload was not ours to finish this way (e.g. no CRC32): start over
            log.info("%s: cannot complete the resumed upload (%s); uploading it again", self.uri, error_code(e))
            t._retry(lambda: t.store.abort_upload(self.bucket, self.key, self.upload_id), "abort upload of %s" % self.key)
            self.existing = {}
            t.progress.unmoved(self.st.st_size)
            self._begin(self._create())
            return
        if got is None or parse_etag(got) != want:
            t._mismatch(self.uri, self.attempt, "the store answered ETag %s, expected %s" % (got, want))
            self.existing = {}
            t.progress.unmoved(self.st.st_size)
            self._begin(self._create())
            return
        remember_etag(self.path, self.st, want)
        t._done(self.st.st_size, copied=True)


def _newer_than(st: os.stat_result, obj: ObjectInfo, slack_s: float = 2.0) -> bool:
    """Whether a local file was modified after the object was stored (clock skew allowed)."""
    return obj.last_modified is not None and st.st_mtime > obj.last_modified.timestamp() + slack_s


def _raise(e: OSError) -> None:
    raise StagingError(e.filename or "?", "cannot read this directory (%s); nothing was staged out" % e.strerror)


def scan_local(src: Path, loc: DataLocation) -> tuple[list[tuple[LocalFile, str]], list[str]]:
    """Files below ``src`` (or ``src`` itself) with their keys, and markers for empty
    directories. Symlinks are skipped with a warning; temporary files are ignored."""
    prefix = loc.key
    if src.is_file():
        st = src.stat()
        return [(LocalFile(src.name, str(src), st.st_size), key_for_rel_path(prefix, src.name, loc.uri))], []
    files, empty = [], []
    for root, dirs, names in os.walk(src, onerror=_raise):
        rel_root = os.path.relpath(root, src)
        rel_root = "" if rel_root == "." else rel_root.replace(os.sep, "/")
        kept_dirs = []
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                log.warning("skipping symlink %s", os.path.join(root, d))
            else:
                kept_dirs.append(d)
        dirs[:] = sorted(kept_dirs)
        count = len(kept_dirs)
        for name in sorted(names):
            p = os.path.join(root, name)
            if name.endswith(PARTIAL_SUFFIX):
                continue
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                log.warning("skipping %s %s", "symlink" if stat.S_ISLNK(st.st_mode) else "special file", p)
                continue
            rel = "%s/%s" % (rel_root, name) if rel_root else name
            files.append((LocalFile(rel, p, st.st_size), key_for_rel_path(prefix, rel, loc.uri)))
            count += 1
        if count == 0 and rel_root:
            empty.append(key_for_rel_path(prefix, rel_root + "/", loc.uri))
    return files, empty

