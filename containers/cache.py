"""A cache of SIF images shared by all users and processes, keyed by content digest.

Every image a job runs is converted once per content digest to a SIF under the cache root
(on the dev cluster ``/srv/aiportal/shared/images/cache``; at a site, a directory of the
shared filesystem every compute node mounts), however many users ask at once.

Layout (flat: one directory holds a few hundred images comfortably)::

    ROOT/sha256/HEX.sif                  the image, mode 0644; appears only complete (rename)
    ROOT/sha256/HEX.lock                 flock'ed (exclusive) while HEX is converted or pruned
    ROOT/sha256/HEX.used                 its mtime is the entry's last use
    ROOT/sha256/.HEX.PID.partial         a conversion in progress (removed if it fails)
    ROOT/refs/KEY.json                   sidecar index: a reference and the identity (path,
                                         inode, size, mtime_ns, ctime_ns) of the files it reads
                                         -> digest, so a hit does not re-hash an unchanged file
    ROOT/apptainer/cache, .../tmp        APPTAINER_CACHEDIR and APPTAINER_TMPDIR of conversions

Digests (``sha256:HEX``) are :mod:`containers.digests`'s: an archive or SIF hashed whole, an OCI
layout's manifest digest, a definition with the files it reads; a registry image's is its
manifest digest (the reference must be pinned, ``docker://NAME@sha256:...``).

Users: directories are created 0755 and files 0644 by whoever converts: the image builder
account (``aiportal-img``), which owns the cache; ``aiportal image convert`` run as root runs
the conversion as that account. Root only reads here, but an index record it writes is given to
the cache root's owner. Other users (job users, ``alice``) only read: :meth:`SifCache.lookup`
works for them (it hashes when it cannot write the index and skips the last-use marker),
:meth:`SifCache.ensure` does not.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from containers.builder import DEFAULT_BUILD_TIMEOUT, ApptainerBuilder
from containers.digests import DIGEST_RE, compute_digest, digest_hex, identity, source_files
from containers.errors import CacheError, ImageRefError
from containers.refs import ImageRef, RefKind, parse_image_ref

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{64}")

#: ``builder(ref, dest)`` writes the SIF for ``ref`` to the file ``dest`` or raises.
Builder = Callable[[ImageRef, Path], None]
#: ``progress(message)`` hears what :meth:`SifCache.ensure` is doing (hashing, waiting, building).
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CacheEntry:
    """One cached image: its digest, SIF path, size, last use (epoch seconds) and the
    references known to have produced it."""

    digest: str
    path: Path
    size_bytes: int
    last_used: float
    refs: tuple[str, ...]


class SifCache:
    """SIF files keyed by content digest under ``root``; see the module docstring for layout.

    ``builder`` (default :class:`~containers.builder.ApptainerBuilder`) converts a reference
    into a file; ``build_timeout`` bounds the default builder's commands.
    """

    def __init__(self, root: Path, builder: Builder | None = None,
                 build_timeout: float = DEFAULT_BUILD_TIMEOUT):
        self.root = Path(root)
        self.images = self.root / "sha256"
        self.refs_dir = self.root / "refs"
        self.apptainer_cachedir = self.root / "apptainer" / "cache"
        self.apptainer_tmpdir = self.root / "apptainer" / "tmp"
        self.builder: Builder = builder or ApptainerBuilder(
            self.apptainer_cachedir, self.apptainer_tmpdir, timeout=build_timeout)

    # -- digests -------------------------------------------------------------------------

    def digest_of(self, ref: ImageRef, progress: Progress | None = None) -> str:
        """``sha256:HEX`` for ``ref``; from the sidecar index when the files it reads are
        unchanged (same inode, size, mtime_ns, ctime_ns), else computed and recorded."""
        if ref.kind is RefKind.DOCKER:
            if ref.digest is None:
                raise ImageRefError(ref.original, "a registry image is cached by its digest: resolve "
                                                  "the tag first (docker://NAME@sha256:...)")
            return ref.digest
        sources = source_files(ref)
        before = identity(sources)
        key = hashlib.sha256(json.dumps([str(ref), before]).encode()).hexdigest()
        record = self._read_record(key)
        if record and record.get("ref") == str(ref) and DIGEST_RE.fullmatch(
                str(record.get("digest"))):
            return record["digest"]
        if progress:
            progress("hashing %s" % ref)
        t0 = time.monotonic()
        digest = compute_digest(ref, sources)
        log.debug("digest of %s is %s (%.2f s)", ref, digest, time.monotonic() - t0)
        if identity(sources) == before:
            self._write_record(key, {"ref": str(ref), "digest": digest, "identity": before})
        else:
            log.info("%s changed while it was hashed; not recording its digest", ref)
        return digest

    # -- paths ---------------------------------------------------------------------------

    def path_for(self, digest: str) -> Path:
        """``ROOT/sha256/HEX.sif`` for ``sha256:HEX`` (whether or not it exists yet)."""
        return self.images / ("%s.sif" % digest_hex(digest))

    def lock_path(self, digest: str) -> Path:
        """The file :meth:`ensure` and :meth:`prune` flock for ``digest``."""
        return self.images / ("%s.lock" % digest_hex(digest))

    def _used_path(self, digest: str) -> Path:
        return self.images / ("%s.used" % digest_hex(digest))

    # -- lookup and conversion -----------------------------------------------------------

    def lookup(self, ref: ImageRef) -> Path | None:
        """The cached SIF for ``ref``, or None; a hit marks the entry used. Fast on a hit
        (a stat, one small index read, a stat), whatever the image's size."""
        digest = self.digest_of(ref)
        path = self.path_for(digest)
        if path.is_file():
            self._mark_used(digest)
            return path
        return None

    def ensure(self, ref: ImageRef, builder: Builder | None = None,
               progress: Progress | None = None, digest: str | None = None) -> Path:
        """The SIF for ``ref``, converting it first if no process has yet. With ``digest``,
        the entry is that digest's (a SIF root built from a definition, handed over by
        ``aiportal image convert``), not ``ref``'s own.

        One conversion per digest across processes and users: an exclusive flock on
        ``HEX.lock``; whoever gets it second finds the SIF and returns it. The builder writes
        ``.HEX.PID.partial`` beside the final name; it is fsync'ed, made 0644 and renamed into
        place, so no half-written SIF is ever visible. A failed build removes its partial
        file and raises (:class:`~containers.errors.ImageBuildError` from the default builder).
        """
        say = progress or (lambda message: None)
        if digest is None:
            digest = self.digest_of(ref, progress=say)
        final = self.path_for(digest)
        if final.is_file():
            self._mark_used(digest)
            say("cached: %s" % final)
            return final
        self._make_dirs()
        with self._lock(digest, exclusive=True, wait=True, progress=say):
            if final.is_file():
                log.info("%s was converted by another process while we waited", digest)
                self._mark_used(digest)
                say("cached: %s" % final)
                return final
            self._remove_partials(digest)
            partial = self.images / (".%s.%d.partial" % (digest_hex(digest), os.getpid()))
            say("converting %s to %s" % (ref, final))
            log.info("converting %s (%s)", ref, digest)
            t0 = time.monotonic()
            try:
                (builder or self.builder)(ref, partial)
                if not partial.is_file() or partial.stat().st_size == 0:
                    raise CacheError(partial, "the builder wrote no image for %s" % ref)
                _fsync(partial)
                os.chmod(partial, 0o644)
                os.rename(partial, final)
                _fsync(self.images)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            self._mark_used(digest, create=True)
            log.info("converted %s to %s in %.1f s", ref, final, time.monotonic() - t0)
            say("converted in %.1f s: %s" % (time.monotonic() - t0, final))
            return final

    # -- listing and pruning -------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every cached image, least recently used first."""
        if not self.images.is_dir():
            return []
        refs: dict[str, set[str]] = {}
        for record in self._records().values():
            refs.setdefault(record["digest"], set()).add(record["ref"])
        out = []
        for sif in self.images.glob("*.sif"):
            if not _HEX.fullmatch(sif.stem):
                continue
            digest = "sha256:" + sif.stem
            try:
                st = sif.stat()
            except FileNotFoundError:
                continue
            try:
                last_used = self._used_path(digest).stat().st_mtime
            except FileNotFoundError:
                last_used = st.st_mtime
            out.append(CacheEntry(digest, sif, st.st_size, last_used,
                                  tuple(sorted(refs.get(digest, ())))))
        return sorted(out, key=lambda e: (e.last_used, e.digest))

    def prune(self, max_bytes: int | None = None, older_than_s: float | None = None,
              now: float | None = None) -> list[CacheEntry]:
        """Remove entries unused for more than ``older_than_s`` seconds, then the least
        recently used until the cache holds at most ``max_bytes``; returns what was removed.

        An entry whose lock is held (a conversion, or :meth:`hold`) is never removed. Also
        drops index records whose files changed or vanished and partial files of dead
        conversions. A SIF that a running job opened keeps working after removal (Unix
        semantics), but a job submitted with a looked-up path can race a prune: prune with
        an age well above the queue wait, or :meth:`hold` the entry.
        """
        if max_bytes is None and older_than_s is None:
            raise ValueError("prune needs max_bytes or older_than_s")
        now = time.time() if now is None else now
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        removed = []
        for entry in entries:
            too_old = older_than_s is not None and now - entry.last_used > older_than_s
            too_big = max_bytes is not None and total > max_bytes
            if not (too_old or too_big):
                continue
            with self._lock(entry.digest, exclusive=True, wait=False) as held:
                if not held:
                    log.info("keeping %s: its lock is held", entry.digest)
                    continue
                entry.path.unlink(missing_ok=True)
                self._used_path(entry.digest).unlink(missing_ok=True)
                self.lock_path(entry.digest).unlink(missing_ok=True)
            log.info("pruned %s (%d bytes, unused for %.0f s)", entry.digest, entry.size_bytes,
                     now - entry.last_used)
            total -= entry.size_bytes
            removed.append(entry)
        gone = {e.digest for e in removed}
        for path, record in self._records().items():
            if record["digest"] in gone or self._stale(record):
                path.unlink(missing_ok=True)
        for partial in self.images.glob(".*.partial") if self.images.is_dir() else ():
            digest = "sha256:" + partial.name[1:65]
            if DIGEST_RE.fullmatch(digest):
                with self._lock(digest, exclusive=True, wait=False) as held:
                    if held:
                        log.info("removing %s left by an interrupted conversion", partial)
                        partial.unlink(missing_ok=True)
                        if not self.path_for(digest).exists():
                            self.lock_path(digest).unlink(missing_ok=True)
        return removed

    def remove(self, digest: str) -> bool:
        """Remove one entry (its SIF, marker, lock and index records), as :meth:`prune` does;
        False when its lock is held (a conversion, or :meth:`hold`) and nothing was removed.
        Whether anything still uses the entry is the caller's to know."""
        with self._lock(digest, exclusive=True, wait=False) as held:
            if not held:
                log.info("keeping %s: its lock is held", digest)
                return False
            self.path_for(digest).unlink(missing_ok=True)
            self._used_path(digest).unlink(missing_ok=True)
            self.lock_path(digest).unlink(missing_ok=True)
        for path, record in self._records().items():
            if record["digest"] == digest:
                path.unlink(missing_ok=True)
        log.info("removed %s", digest)
        return True

    @contextmanager
    def hold(self, digest: str) -> Iterator[Path]:
        """Keep ``digest`` from being pruned while the block runs (a shared lock)."""
        with self._lock(digest, exclusive=False, wait=True):
            yield self.path_for(digest)

    # -- internals -----------------------------------------------------------------------

    @contextmanager
    def _lock(self, digest: str, exclusive: bool, wait: bool,
              progress: Progress | None = None) -> Iterator[bool]:
        """flock ``HEX.lock``; yields False when ``wait`` is off and someone else holds it.

        Re-opens when the lock file was replaced while waiting (prune unlinks lock files
        under the lock, so a waiter may end up holding an unlinked one)."""
        path = self.lock_path(digest)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise CacheError(path, "cannot open the lock (%s); conversions run as the "
                                           "cache's owner" % e.strerror) from e
            try:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        os.close(fd)
                        yield False
                        return
                    if progress:
                        progress("waiting for another conversion of %s" % digest)
                    fcntl.flock(fd, mode)
                st = os.fstat(fd)
                try:
                    now = os.stat(path)
                    same = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)

    def _make_dirs(self) -> None:
        for d in (self.root, self.images, self.refs_dir, self.apptainer_cachedir.parent,
                  self.apptainer_cachedir, self.apptainer_tmpdir):
            try:
                d.mkdir(parents=d is self.root)
            except FileExistsError:
                continue
            except PermissionError as e:
                raise CacheError(d, "cannot create it (%s); conversions run as the cache's "
                                    "owner (root or the conversion service account)"
                                 % e.strerror) from e
            # the images and the index cannot be listed by other users: a SIF is read by its
            # digest, which the portal hands out only after checking the user may read it
            os.chmod(d, 0o711 if d in (self.images, self.refs_dir) else 0o755)

    def _mark_used(self, digest: str, create: bool = False) -> None:
        path = self._used_path(digest)
        try:
            os.utime(path)
        except FileNotFoundError:
            if create:
                path.touch(mode=0o644)
        except OSError as e:
            log.debug("cannot mark %s used: %s", digest, e)

    def _remove_partials(self, digest: str) -> None:
        """Partial files of conversions that died (only called under the exclusive lock)."""
        for old in self.images.glob(".%s.*.partial" % digest_hex(digest)):
            log.info("removing %s left by an interrupted conversion", old)
            old.unlink(missing_ok=True)

    def _read_record(self, key: str) -> dict | None:
        try:
            record = json.loads((self.refs_dir / ("%s.json" % key)).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self, key: str, record: dict) -> None:
        path = self.refs_dir / ("%s.json" % key)
        tmp = self.refs_dir / (".%s.%d.tmp" % (key, os.getpid()))
        try:
            if not self.refs_dir.is_dir():
                self._make_dirs()
            tmp.write_text(json.dumps(record))
            os.chmod(tmp, 0o644)
            if os.geteuid() == 0:           # root (the portal) writes the index for the cache's owner
                owner = self.root.stat()
                os.chown(tmp, owner.st_uid, owner.st_gid)
            os.replace(tmp, path)
        except (OSError, CacheError) as e:
            log.debug("cannot record the digest of %s: %s", record["ref"], e)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def _records(self) -> dict[Path, dict]:
        out = {}
        if not self.refs_dir.is_dir():
            return out
        for path in self.refs_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if isinstance(record, dict) and isinstance(record.get("ref"), str) and \
                    DIGEST_RE.fullmatch(str(record.get("digest"))):
                out[path] = record
        return out

    def _stale(self, record: dict) -> bool:
        """True when the files a record describes changed or vanished."""
        try:
            ref = parse_image_ref(record["ref"])
            return identity(source_files(ref)) != record.get("identity")
        except (ImageRefError, OSError):
            return True


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


