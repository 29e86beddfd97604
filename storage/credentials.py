"""Data sources (an S3 endpoint, region and keys), their encryption at rest, and the job's
credentials file.

* At rest (the portal's database): :func:`seal_source` turns a :class:`DataSource` into a
  record whose keys are Fernet tokens (AES-128-CBC + HMAC-SHA256) under the site's data key
  (``data_key`` in portal.toml; there is no default key). :func:`open_source` reverses it.
* In a job: :func:`write_job_credentials` writes the sources the job needs, in clear, into
  ``JOB_DIR/.aiportal-credentials.json`` (mode 0600, owned by the job's user, created with
  ``O_EXCL|O_NOFOLLOW`` and renamed into place); ``aiportal stage --credentials FILE`` reads
  it with :func:`read_credentials_file`, which refuses a file others can read. The batch script
  holds only the file's path; the portal removes the file when the job is over
  (:func:`remove_job_credentials`).

File format (JSON)::

    {"format": "aiportal-credentials/1",
     "sources": {"NAME": {"endpoint": "http://127.0.0.1:9000", "region": "us-east-1",
                          "access_key": "...", "secret_key": "...",
                          "buckets": ["b1", "b2"],          # optional: which buckets it serves
                          "bandwidth_mbps": 800,            # optional: per-job cap, megabits/s
                          "workers": 8}}}                   # optional: concurrent requests

A flat ``{"endpoint", "region", "access_key", "secret_key"}`` object (the admin file Ansible
writes) is read as one source named ``default``.

Nothing here puts a key into a message, a log line or a ``repr``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from storage.errors import CredentialsError, LocationError
from storage.uris import DataLocation, Scheme

FORMAT = "aiportal-credentials/1"
JOB_CREDENTIALS_NAME = ".aiportal-credentials.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REGION_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class DataSource:
    """An S3-compatible store and the keys to use on it."""

    name: str
    endpoint: str
    region: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    buckets: tuple[str, ...] = ()     #: buckets this source serves; () = any
    bandwidth_mbps: float | None = None
    workers: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(self.buckets))
        check_source(self)

    def __repr__(self) -> str:
        return "DataSource(name=%r, endpoint=%r, region=%r, access_key=%s, buckets=%r)" % (
            self.name, self.endpoint, self.region, mask(self.access_key), self.buckets)

    def to_dict(self) -> dict[str, Any]:
        """The clear-text entry of a credentials file."""
        out: dict[str, Any] = {"endpoint": self.endpoint, "region": self.region,
                               "access_key": self.access_key, "secret_key": self.secret_key}
        if self.buckets:
            out["buckets"] = list(self.buckets)
        if self.bandwidth_mbps:
            out["bandwidth_mbps"] = self.bandwidth_mbps
        if self.workers:
            out["workers"] = self.workers
        return out

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], where: str = "data source") -> "DataSource":
        if not isinstance(d, Mapping):
            raise CredentialsError("%s: data source %r must be a JSON object" % (where, name))
        missing = [k for k in ("endpoint", "access_key", "secret_key") if not d.get(k)]
        if missing:
            raise CredentialsError("%s: data source %r lacks %s" % (where, name, ", ".join(missing)))
        unknown = set(d) - {"endpoint", "region", "access_key", "secret_key", "buckets", "bandwidth_mbps", "workers"}
        if unknown:
            raise CredentialsError("%s: data source %r has unknown fields %s" % (where, name, ", ".join(sorted(unknown))))
        try:
            return cls(name=name, endpoint=str(d["endpoint"]), region=str(d.get("region") or "us-east-1"),
                       access_key=str(d["access_key"]), secret_key=str(d["secret_key"]),
                       buckets=tuple(d.get("buckets") or ()),
                       bandwidth_mbps=float(d["bandwidth_mbps"]) if d.get("bandwidth_mbps") else None,
                       workers=int(d["workers"]) if d.get("workers") else None)
        except (TypeError, ValueError) as e:
            raise CredentialsError("%s: data source %r: %s" % (where, name, e)) from None


def mask(key: str) -> str:
    """Enough of an access key to tell keys apart in a message: ``AKIA...``, never a secret."""
    return (key[:4] + "...") if len(key) > 8 else "..."


def check_source(src: DataSource) -> None:
    """Pure validation of a data source's public fields (not whether the keys work)."""
    if not _NAME_RE.match(src.name or ""):
        raise CredentialsError("data source name %r: use 1-64 letters, digits, '.', '_' or '-'" % src.name)
    parts = urlsplit(src.endpoint)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise CredentialsError("data source %r: endpoint %r must be http(s)://HOST[:PORT] without a path "
                               "or credentials" % (src.name, src.endpoint))
    if not _REGION_RE.match(src.region or ""):
        raise CredentialsError("data source %r: region %r is not a region name (e.g. us-east-1)" % (src.name, src.region))
    for k in (src.access_key, src.secret_key):
        if not k or any(c.isspace() for c in k) or len(k) > 256:
            raise CredentialsError("data source %r: access and secret keys must be 1-256 characters without "
                                   "spaces" % src.name)
    if src.bandwidth_mbps is not None and src.bandwidth_mbps <= 0:
        raise CredentialsError("data source %r: bandwidth_mbps must be positive" % src.name)
    if src.workers is not None and not 1 <= src.workers <= 64:
        raise CredentialsError("data source %r: workers must be 1-64" % src.name)


def resolve_source(sources: Mapping[str, DataSource], loc: DataLocation) -> DataSource:
    """The data source that serves an ``s3://`` location: the one that lists its bucket, else
    the only one that lists no buckets (serves any)."""
    if loc.scheme is not Scheme.S3:
        raise LocationError(loc.original, "not an s3:// location")
    if not sources:
        raise LocationError(loc.original, "no data source credentials for this job; register a data source "
                                          "for bucket %r (or pass --credentials FILE)" % loc.bucket)
    named = [s for s in sources.values() if loc.bucket in s.buckets]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise LocationError(loc.original, "bucket %r is served by several data sources (%s); keep one"
                                          % (loc.bucket, ", ".join(sorted(s.name for s in named))))
    wildcard = [s for s in sources.values() if not s.buckets]
    if len(wildcard) == 1:
        return wildcard[0]
    if not wildcard:
        raise LocationError(loc.original, "no data source serves bucket %r (known: %s)"
                                          % (loc.bucket, ", ".join(sorted(sources))))
    raise LocationError(loc.original, "several data sources could serve bucket %r (%s); list the bucket "
                                      "in one of them" % (loc.bucket, ", ".join(sorted(s.name for s in wildcard))))


# -- encryption at rest -----------------------------------------------------------------------

class SecretBox:
    """Encrypts and decrypts secrets with the site's data key(s).

    ``keys`` is one Fernet key, or several separated by commas: the first encrypts, all
    decrypt (rotate by putting a new key first, re-sealing records, then dropping the old one).
    """

    def __init__(self, keys: str):
        from cryptography.fernet import Fernet, MultiFernet
        if not keys or not keys.strip():
            raise CredentialsError("the data key (setting 'data_key') is missing; there is no default key. "
                                   "Generate one with `python3 -c 'from cryptography.fernet import Fernet; "
                                   "print(Fernet.generate_key().decode())'` and put it in portal.toml")
        try:
            self._f = MultiFernet([Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()])
        except (ValueError, TypeError):
            raise CredentialsError("the data key (setting 'data_key') is not a Fernet key: 32 random bytes, "
                                   "url-safe base64 (44 characters)") from None

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    @staticmethod
    def generate_key() -> str:
        from cryptography.fernet import Fernet
        return Fernet.generate_key().decode()

    def seal(self, plaintext: str) -> str:
        return self._f.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def open(self, token: str, what: str = "a secret") -> str:
        from cryptography.fernet import InvalidToken
        try:
            return self._f.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, AttributeError):
            raise CredentialsError("cannot decrypt %s: it was sealed with another data key, or the record "
                                   "is damaged" % what) from None


def seal_source(box: SecretBox, src: DataSource) -> dict[str, Any]:
    """The record to store (JSON-able): public fields in clear, both keys sealed."""
    rec = src.to_dict()
    rec["name"] = src.name
    rec["access_key"] = box.seal(src.access_key)
    rec["secret_key"] = box.seal(src.secret_key)
    rec["sealed"] = True
    return rec


def open_source(box: SecretBox, record: Mapping[str, Any]) -> DataSource:
    if not record.get("sealed"):
        raise CredentialsError("data source record %r is not sealed; store only seal_source() records"
                               % record.get("name"))
    name = str(record.get("name"))
    d = dict(record)
    d.pop("name", None)
    d.pop("sealed", None)
    d["access_key"] = box.open(str(record.get("access_key")), "the access key of data source %r" % name)
    d["secret_key"] = box.open(str(record.get("secret_key")), "the secret key of data source %r" % name)
    return DataSource.from_dict(name, d)


# -- the job's credentials file -----------------------------------------------------------------

def credentials_document(sources: Iterable[DataSource]) -> dict[str, Any]:
    return {"format": FORMAT, "sources": {s.name: s.to_dict() for s in sources}}


def parse_credentials(doc: Any, where: str = "credentials") -> dict[str, DataSource]:
    """Sources from a parsed credentials document (either format)."""
    if not isinstance(doc, Mapping):
        raise CredentialsError("%s: expected a JSON object" % where)
    if "sources" not in doc and "endpoint" in doc:   # the flat admin file
        return {"default": DataSource.from_dict("default", {k: v for k, v in doc.items()
                                                            if k in ("endpoint", "region", "access_key", "secret_key")}, where)}
    if doc.get("format") != FORMAT or not isinstance(doc.get("sources"), Mapping):
        raise CredentialsError("%s: not an aiportal credentials file (format %r, expected %r)"
                               % (where, doc.get("format"), FORMAT))
    return {name: DataSource.from_dict(name, d, where) for name, d in doc["sources"].items()}


def read_credentials_file(path: str | os.PathLike) -> dict[str, DataSource]:
    """Read a credentials file: a regular file (not a symlink), owned by this user (or read by
    root), that nobody else can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CredentialsError("cannot open the credentials file %s: %s%s" % (
            path, e.strerror, " (a symlink is not accepted)" if e.errno == errno.ELOOP else "")) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsError("the credentials file %s is not a regular file" % path)
        if st.st_mode & 0o077:
            raise CredentialsError("the credentials file %s can be read by others (mode %04o); "
                                   "run `chmod 600 %s`" % (path, st.st_mode & 0o777, path))
        euid = os.geteuid()
        if st.st_uid != euid and euid != 0:
            raise CredentialsError("the credentials file %s belongs to uid %d, not to this user (uid %d)"
                                   % (path, st.st_uid, euid))
        raw = f.read(1 << 20)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        # the decoder's message has a position, never the content
        raise CredentialsError("the credentials file %s is not valid JSON (%s)" % (
            path, e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8")) from None
    return parse_credentials(doc, str(path))


def write_job_credentials(job_dir: str | os.PathLike, sources: Iterable[DataSource],
                          user: str | int | None = None, name: str = JOB_CREDENTIALS_NAME) -> Path:
    """Write ``job_dir/name`` with the sources a job needs: mode 0600, owned by ``user`` (a name
    or uid; when running as root), written to a fresh temporary name and renamed into place.
    The job directory itself must not be a symlink (the portal writes into a user-owned
    directory as root). Returns the file's path."""
    import pwd
    job_dir = Path(job_dir)
    uid = gid = None
    if user is not None and os.geteuid() == 0:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    data = json.dumps(credentials_document(sources), indent=1).encode("utf-8")
    try:
        dfd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise CredentialsError("cannot write credentials into %s: %s (it must be an existing directory, "
                               "not a symlink)" % (job_dir, e.strerror)) from None
    tmp = "%s.%s.tmp" % (name, secrets.token_hex(6))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o600)
            if uid is not None:
                os.fchown(fd, uid, gid)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as e:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise CredentialsError("cannot write credentials into %s: %s" % (job_dir, e.strerror)) from None
    finally:
        os.close(dfd)
    return job_dir / name


def remove_job_credentials(job_dir: str | os.PathLike, name: str = JOB_CREDENTIALS_NAME) -> bool:
    """Remove the job's credentials file; True if there was one."""
    try:
        os.unlink(Path(job_dir) / name)
        return True
    except FileNotFoundError:
        return False


def load_credentials(credentials: str | os.PathLike | Mapping[str, DataSource] | None) -> dict[str, DataSource]:
    """Sources from a file path, a mapping of sources, or nothing."""
    if credentials is None:
        return {}
    if isinstance(credentials, Mapping):
        return dict(credentials)
    return read_credentials_file(credentials)
