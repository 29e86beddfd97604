"""Data locations: shared-filesystem paths and ``s3://bucket/prefix``. Pure functions.

* ``/abs/path`` (or ``file:///abs/path``): a file or directory on the shared filesystem.
* ``s3://bucket/prefix``: every object under ``prefix/`` (a "directory"), or the single object
  ``prefix``; the data source (endpoint, region, keys) is resolved from the bucket, see
  :func:`storage.credentials.resolve_source`.

Anything that would let a name climb out of where it belongs is refused here, by syntax: ``..``
and ``.`` segments, empty segments, NUL bytes and newlines. Symlinks are checked where the
filesystem is (:mod:`storage.validate`, and the walkers never follow them).
"""
from __future__ import annotations

import enum
import ipaddress
import posixpath
import re
from dataclasses import dataclass

from storage.errors import LocationError

MAX_KEY_BYTES = 1024
MAX_NAME_BYTES = 255
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class Scheme(enum.Enum):
    SHARED = "shared"
    S3 = "s3"


@dataclass(frozen=True)
class DataLocation:
    scheme: Scheme
    path: str            # absolute path (SHARED) or "bucket/prefix" (S3; no trailing slash)
    original: str

    @property
    def bucket(self) -> str:
        """The bucket of an S3 location."""
        return self.path.partition("/")[0]

    @property
    def key(self) -> str:
        """The key prefix of an S3 location ('' for the whole bucket), without a trailing slash."""
        return self.path.partition("/")[2]

    @property
    def uri(self) -> str:
        return "s3://%s" % self.path if self.scheme is Scheme.S3 else self.path

    def child(self, rel: str) -> "DataLocation":
        """The location of ``rel`` (a relative POSIX path) below this one."""
        if self.scheme is Scheme.S3:
            return DataLocation(Scheme.S3, join_key(self.path, rel), self.original)
        return DataLocation(Scheme.SHARED, posixpath.join(self.path, rel), self.original)


def _bad_chars(text: str) -> bool:
    return any(c in text for c in "\0\n\r")


def parse_location(text: str) -> DataLocation:
    """Parse a data location; raises :class:`LocationError` naming the fix."""
    if not text or _bad_chars(text):
        raise LocationError(text, "a data location is an absolute path or s3://bucket/prefix "
                                  "(without newlines or NUL bytes)")
    if text.startswith("s3://"):
        rest = text[5:]
        if not rest or rest.startswith("/"):
            raise LocationError(text, "name the bucket: s3://bucket/prefix")
        bucket, _, prefix = rest.partition("/")
        check_bucket_name(bucket, text)
        prefix = prefix.rstrip("/")
        if prefix:
            check_key(prefix, text)
        return DataLocation(Scheme.S3, "%s/%s" % (bucket, prefix) if prefix else bucket, text)
    original = text
    if text.startswith("file://"):
        text = text[7:]
    if "://" in text:
        raise LocationError(text, "unknown scheme; use an absolute path on the shared filesystem or s3://bucket/prefix")
    if not text.startswith("/"):
        raise LocationError(text, "relative paths are ambiguous on compute nodes; give an absolute path")
    return DataLocation(Scheme.SHARED, text, original)


def check_bucket_name(bucket: str, uri: str | None = None) -> str:
    """S3 bucket naming rules: 3-63 of a-z, 0-9, '.', '-'; starts and ends with a letter or
    digit; no '..'; not an IP address."""
    uri = uri or "s3://%s" % bucket
    ok = bool(_BUCKET_RE.match(bucket)) and ".." not in bucket
    if ok:
        try:
            ipaddress.ip_address(bucket)
            ok = False
        except ValueError:
            pass
    if not ok:
        raise LocationError(uri, "%r is not a valid bucket name: use 3-63 lowercase letters, digits, "
                                 "'.' and '-', starting and ending with a letter or digit" % bucket)
    return bucket


def _check_segments(segments: list[str], uri: str, what: str) -> None:
    for seg in segments:
        if seg in ("", ".", ".."):
            raise LocationError(uri, "%s contains %s; '.', '..' and empty path segments are not allowed "
                                     "in data locations" % (what, "an empty segment ('//')" if seg == "" else repr(seg)))
        if len(seg.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise LocationError(uri, "%s has a name longer than %d bytes (%s...), which no local "
                                     "filesystem can hold" % (what, MAX_NAME_BYTES, seg[:40]))


def check_key(key: str, uri: str | None = None) -> str:
    """A key (or key prefix) that maps onto a relative local path without escaping it."""
    uri = uri or key
    if _bad_chars(key) or key.startswith("/"):
        raise LocationError(uri, "object keys cannot start with '/' or contain newlines or NUL bytes")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise LocationError(uri, "the name is not valid UTF-8; rename it (S3 keys are UTF-8)") from None
    if len(raw) > MAX_KEY_BYTES:
        raise LocationError(uri, "the key is longer than %d bytes" % MAX_KEY_BYTES)
    _check_segments(key.split("/"), uri, "the key")
    return key


def join_key(prefix: str, rel: str) -> str:
    return "%s/%s" % (prefix, rel) if prefix else rel


def rel_path_for_key(prefix: str, key: str, uri: str) -> str:
    """The relative POSIX path of ``key`` below ``prefix`` (a prefix without trailing slash;
    the key is ``prefix/...``); refuses keys that would leave the destination directory.
    A directory marker (``a/b/``) gives ``a/b/``."""
    if prefix:
        if not key.startswith(prefix + "/"):
            raise LocationError(uri, "key %r is not below %r" % (key, prefix))
        rel = key[len(prefix) + 1:]
    else:
        rel = key
    is_dir = rel.endswith("/")
    body = rel[:-1] if is_dir else rel
    if not body:
        return ""
    if _bad_chars(body) or body.startswith("/"):
        raise LocationError(uri, "object %r cannot be staged: its name has a leading '/', a newline or "
                                 "a NUL byte; rename it in the bucket" % key)
    try:
        _check_segments(body.split("/"), uri, "object %r" % key)
    except LocationError as e:
        raise LocationError(uri, "%s; it would not land inside the destination directory, rename it "
                                 "in the bucket" % e.reason) from None
    return body + ("/" if is_dir else "")


def key_for_rel_path(prefix: str, rel: str, uri: str) -> str:
    """The key for a relative local path (with '/' separators) below ``prefix``."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise LocationError(uri, "local file %r has a name that is not valid UTF-8 and cannot become an "
                                 "S3 key; rename it" % rel.encode("utf-8", "surrogateescape")) from None
    key = join_key(prefix, rel)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise LocationError(uri, "local file %r gives a key longer than %d bytes" % (rel, MAX_KEY_BYTES))
    return key


def check_shared_path(path: str, roots: tuple[str, ...] | list[str] = (), uri: str | None = None) -> str:
    """Lexical checks of a shared-filesystem path: absolute, no '.'/'..' or empty segments,
    and (when ``roots`` are given) under one of them. Returns the path without a trailing
    slash. Symlinks need the filesystem: :func:`storage.validate.validate_location`."""
    uri = uri or path
    if not path.startswith("/") or _bad_chars(path):
        raise LocationError(uri, "give an absolute path on the shared filesystem")
    trimmed = path.rstrip("/") or "/"
    segments = [s for s in trimmed.split("/")[1:]] if trimmed != "/" else []
    _check_segments(segments, uri, "the path")
    if roots:
        for root in roots:
            root = root.rstrip("/") or "/"
            if trimmed == root or trimmed.startswith(root.rstrip("/") + "/"):
                return trimmed
        raise LocationError(uri, "is outside the data roots this account may use (%s)" % ", ".join(roots))
    return trimmed
