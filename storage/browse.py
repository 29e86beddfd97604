"""What the portal asks of a data source besides staging: browse a prefix, the size of a
dataset, presigned download links (SigV4) for outputs, and server-side copies.

Each function opens its own client for one data source (cheap; the portal calls these per
request) and words failures with :func:`storage.s3.translate`. The portal browses through
:func:`storage.store.browse`, which picks the store by scheme and calls :func:`list_prefix` for
``s3://``; :class:`Entry` and :class:`Listing` are :mod:`storage.store`'s records.
"""
from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Callable, TypeVar

from storage.credentials import DataSource
from storage.errors import LocationError, StagingError
from storage.integrity import part_ranges
from storage.retry import RetryPolicy
from storage.s3 import S3Store, translate
from storage.store import Entry, Listing
from storage.uris import DataLocation, Scheme, join_key, parse_location

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_COPY_BYTES = 5 * (1 << 30)          # CopyObject's limit; larger objects go part by part
COPY_PART_BYTES = 512 * (1 << 20)
MAX_PRESIGN_S = 7 * 24 * 3600           # SigV4's limit


@dataclass(frozen=True)
class DatasetSize:
    files: int
    bytes: int


def _s3(text: str | DataLocation) -> DataLocation:
    loc = text if isinstance(text, DataLocation) else parse_location(text)
    if loc.scheme is not Scheme.S3:
        raise LocationError(loc.original, "not an s3:// location")
    return loc


def _call(source: DataSource, uri: str, fn: Callable[[S3Store], T]) -> T:
    with S3Store(source, workers=2) as store:
        try:
            return fn(store)
        except (LocationError, StagingError):
            raise
        except Exception as e:  # noqa: BLE001 - worded by translate()
            raise translate(e, uri, source) from e


def list_prefix(source: DataSource, location: str | DataLocation, page_size: int = 1000,
                token: str | None = None) -> Listing:
    """One level of ``s3://bucket/prefix``: sub-"directories" first, then objects, by name."""
    loc = _s3(location)
    prefix = loc.key + "/" if loc.key else ""

    def run(store: S3Store) -> Listing:
        prefixes, objects, nxt = store.list_dir(loc.bucket, prefix, page_size, token)
        entries = [Entry(p[len(prefix):].rstrip("/"), "s3://%s/%s" % (loc.bucket, p.rstrip("/")), True)
                   for p in prefixes]
        entries += [Entry(o.key[len(prefix):], "s3://%s/%s" % (loc.bucket, o.key), False, o.size, o.last_modified)
                    for o in objects if o.key != prefix and not o.key.endswith("/")]
        return Listing(entries, nxt)
    return _call(source, loc.uri, run)


def dataset_size(source: DataSource, location: str | DataLocation) -> DatasetSize:
    """Files and bytes under ``s3://bucket/prefix`` (or of the single object ``prefix``)."""
    loc = _s3(location)

    def run(store: S3Store) -> DatasetSize:
        files = total = 0
        for o in store.list(loc.bucket, loc.key + "/" if loc.key else ""):
            if not o.key.endswith("/"):
                files += 1
                total += o.size
        if files == 0 and loc.key:
            one = store.head(loc.bucket, loc.key)
            if one is not None:
                return DatasetSize(1, one.size)
        return DatasetSize(files, total)
    return _call(source, loc.uri, run)


def presigned_url(source: DataSource, location: str | DataLocation, expires_s: int = 3600,
                  check_exists: bool = True) -> str:
    """A SigV4 presigned GET link to one object, valid ``expires_s`` seconds (at most 7 days),
    served as a download named after the object."""
    loc = _s3(location)
    if not loc.key:
        raise LocationError(loc.uri, "a download link needs an object, not a bucket")
    if not 1 <= expires_s <= MAX_PRESIGN_S:
        raise LocationError(loc.uri, "links can be valid for 1 s to 7 days, not %d s" % expires_s)

    def run(store: S3Store) -> str:
        if check_exists and store.head(loc.bucket, loc.key) is None:
            raise LocationError(loc.uri, "no such object (only files can be downloaded, not prefixes)")
        return store.presign_get(loc.bucket, loc.key, expires_s, filename=posixpath.basename(loc.key))
    return _call(source, loc.uri, run)


def copy_prefix(source: DataSource, src: str | DataLocation, dst: str | DataLocation,
                retry: RetryPolicy | None = None) -> DatasetSize:
    """Server-side copy of every object under ``src`` to the same relative keys under ``dst``
    (or of one object), in the same data source: the bytes never leave the store. Objects over
    5 GiB are copied part by part. Returns what was copied."""
    s, d = _s3(src), _s3(dst)
    retry = retry or RetryPolicy()
    if _overlaps(s, d):
        raise LocationError(d.uri, "the destination is inside the source (or the other way round)")

    def run(store: S3Store) -> DatasetSize:
        objects = list(store.list(s.bucket, s.key + "/" if s.key else ""))
        if not objects and s.key:
            one = store.head(s.bucket, s.key)
            if one is None:
                raise LocationError(s.uri, "no objects under this prefix")
            pairs = [(one, d.key or posixpath.basename(s.key))]
        else:
            pairs = [(o, join_key(d.key, o.key[len(s.key) + 1:] if s.key else o.key)) for o in objects]
        total = 0
        for o, key in pairs:
            if o.size <= MAX_COPY_BYTES:
                retry.call(lambda: store.copy(s.bucket, o.key, d.bucket, key), "copy %s" % o.key)
            else:
                _copy_large(store, retry, s.bucket, o.key, o.size, d.bucket, key)
            total += o.size
        return DatasetSize(len(pairs), total)
    return _call(source, s.uri, run)


def _overlaps(a: DataLocation, b: DataLocation) -> bool:
    if a.bucket != b.bucket:
        return False
    ka, kb = a.key + "/", b.key + "/"
    return ka.startswith(kb) or kb.startswith(ka) if a.key and b.key else True


def _copy_large(store: S3Store, retry: RetryPolicy, sb: str, sk: str, size: int, db: str, dk: str) -> None:
    upload_id = retry.call(lambda: store.create_upload(db, dk), "start copy of %s" % sk)
    try:
        etags = [retry.call(lambda: store.copy_part(sb, sk, db, dk, upload_id, n, off, length), "copy part %d" % n)
                 for n, (off, length) in enumerate(part_ranges(size, COPY_PART_BYTES), 1)]
        retry.call(lambda: store.complete_upload(db, dk, upload_id, etags), "complete copy of %s" % sk)
    except BaseException:
        store.abort_upload(db, dk, upload_id)
        raise
