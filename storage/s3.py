"""The S3 adapter: the only module that talks to boto3.

One :class:`S3Store` per data source and process; its client is thread-safe and pools up to
``workers`` connections. Requests are signed with SigV4 (``signature_version="s3v4"``, path-style
addressing for custom endpoints); botocore's own retries are off because the transfer engine
retries with its own backoff and knows when to give up. Bodies are sent unsigned (on http too)
with a ``Content-MD5`` the store checks instead: hashing every part twice would cost a CPU core.

:func:`translate` turns what boto3 raises into this package's errors, by error code only:
servers echo request details into messages, and those never reach a log line here.
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.credentials import DataSource
from storage.errors import AccessDeniedError, LocationError, StagingError, StorageError, StoreUnavailableError
from storage.retry import describe, error_code, http_status, is_transient

log = logging.getLogger(__name__)

DENIED_CODES = frozenset({"SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                          "AuthorizationHeaderMalformed"})


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None
    last_modified: datetime | None = None


class S3Store:
    """S3 operations on one data source. Each method is one request (listings: one per page)
    and raises what boto3 raises; retries and error wording are the caller's."""

    def __init__(self, source: DataSource, workers: int = 8, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0):
        self.source = source
        config = Config(signature_version="s3v4", max_pool_connections=max(workers, 1) + 4,
                        connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"total_max_attempts": 1},
                        s3={"addressing_style": "path", "payload_signing_enabled": False},
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        user_agent_extra="aiportal-stage")
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=source.endpoint, region_name=source.region,
            aws_access_key_id=source.access_key, aws_secret_access_key=source.secret_key, config=config)

    def __repr__(self) -> str:
        return "S3Store(%r)" % self.source

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "S3Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        token = None
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            page = self.client.list_objects_v2(**kw)
            for o in page.get("Contents", ()):
                yield ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag"), o.get("LastModified"))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def list_dir(self, bucket: str, prefix: str, max_keys: int = 1000,
                 token: str | None = None) -> tuple[list[str], list[ObjectInfo], str | None]:
        """One level below ``prefix`` (which ends in '/' or is ''): (sub-prefixes, objects,
        continuation token or None)."""
        kw = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": max_keys}
        if token:
            kw["ContinuationToken"] = token
        page = self.client.list_objects_v2(**kw)
        prefixes = [p["Prefix"] for p in page.get("CommonPrefixes", ())]
        objects = [ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag"), o.get("LastModified"))
                   for o in page.get("Contents", ())]
        return prefixes, objects, page.get("NextContinuationToken") if page.get("IsTruncated") else None

    def head(self, bucket: str, key: str, part_number: int | None = None) -> ObjectInfo | None:
        """The object (or, with ``part_number``, that part's size), or None if there is none."""
        kw = {"Bucket": bucket, "Key": key}
        if part_number:
            kw["PartNumber"] = part_number
        try:
            r = self.client.head_object(**kw)
        except ClientError as e:
            if http_status(e) == 404 and error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(key, int(r["ContentLength"]), r.get("ETag"), r.get("LastModified"))

    def head_bucket(self, bucket: str) -> None:
        self.client.head_bucket(Bucket=bucket)

    def get(self, bucket: str, key: str, sink: Callable[[bytes], object], start: int | None = None,
            length: int | None = None, chunk: int = 1 << 20) -> tuple[int, str | None]:
        """Stream the object (or ``length`` bytes from ``start``) into ``sink``, chunk by chunk.
        Returns (bytes received, the ETag the store sent)."""
        kw = {"Bucket": bucket, "Key": key}
        if start is not None and length is not None:
            if length == 0:
                return 0, None
            kw["Range"] = "bytes=%d-%d" % (start, start + length - 1)
        r = self.client.get_object(**kw)
        body = r["Body"]
        got = 0
        try:
            for b in body.iter_chunks(chunk):
                sink(b)
                got += len(b)
        finally:
            body.close()
        return got, r.get("ETag")

    # -- writing ----------------------------------------------------------------------------

    @staticmethod
    def _md5_header(md5: bytes) -> str:
        return base64.b64encode(md5).decode("ascii")

    def put(self, bucket: str, key: str, data: bytes, md5: bytes) -> str | None:
        return self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=self._md5_header(md5)).get("ETag")

    def create_upload(self, bucket: str, key: str, crc32: bool = False) -> str:
        """Start a multipart upload; with ``crc32`` every part carries a CRC32 checksum and the
        object gets a COMPOSITE one."""
        kw = {"ChecksumAlgorithm": "CRC32"} if crc32 else {}
        return self.client.create_multipart_upload(Bucket=bucket, Key=key, **kw)["UploadId"]

    def upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes, md5: bytes,
                    crc32: str | None = None) -> str | None:
        kw = {"ChecksumCRC32": crc32} if crc32 else {}
        return self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                                       ContentMD5=self._md5_header(md5), **kw).get("ETag")

    def complete_upload(self, bucket: str, key: str, upload_id: str, etags: list[str],
                        crc32s: list[str] | None = None) -> str | None:
        parts = [{"PartNumber": i, "ETag": e} for i, e in enumerate(etags, 1)]
        if crc32s:
            for p, c in zip(parts, crc32s):
                p["ChecksumCRC32"] = c
        return self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                     MultipartUpload={"Parts": parts}).get("ETag")

    def checksum_crc32(self, bucket: str, key: str) -> str | None:
        """The object's CRC32 checksum (``BASE64-N`` for a multipart object), if it has one."""
        r = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return r.get("ChecksumCRC32")

    def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if error_code(e) != "NoSuchUpload":
                raise

    def uploads(self, bucket: str, key: str) -> list[tuple[str, datetime | None]]:
        """Unfinished multipart uploads of exactly ``key``: (upload id, initiated), newest first."""
        out = []
        kw = {"Bucket": bucket, "Prefix": key}
        while True:
            page = self.client.list_multipart_uploads(**kw)
            out += [(u["UploadId"], u.get("Initiated")) for u in page.get("Uploads", ()) if u.get("Key") == key]
            if not page.get("IsTruncated"):
                break
            kw.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))
        return sorted(out, key=lambda u: (u[1] is not None, u[1]), reverse=True)

    def parts(self, bucket: str, key: str, upload_id: str) -> dict[int, tuple[int, str, str | None]]:
        """Parts already uploaded: number -> (size, ETag, CRC32 checksum or None)."""
        out: dict[int, tuple[int, str, str | None]] = {}
        kw = {"Bucket": bucket, "Key": key, "UploadId": upload_id}
        while True:
            page = self.client.list_parts(**kw)
            for p in page.get("Parts", ()):
                out[int(p["PartNumber"])] = (int(p["Size"]), p.get("ETag") or "", p.get("ChecksumCRC32"))
            if not page.get("IsTruncated"):
                return out
            kw["PartNumberMarker"] = page.get("NextPartNumberMarker")

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> str | None:
        """Server-side copy of one object up to 5 GiB (the bytes never leave the store)."""
        r = self.client.copy_object(Bucket=dst_bucket, Key=dst_key, CopySource={"Bucket": src_bucket, "Key": src_key})
        return r.get("CopyObjectResult", {}).get("ETag")

    def copy_part(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str, upload_id: str,
                  number: int, start: int, length: int) -> str | None:
        r = self.client.upload_part_copy(Bucket=dst_bucket, Key=dst_key, UploadId=upload_id, PartNumber=number,
                                         CopySource={"Bucket": src_bucket, "Key": src_key},
                                         CopySourceRange="bytes=%d-%d" % (start, start + length - 1))
        return r.get("CopyPartResult", {}).get("ETag")

    def presign_get(self, bucket: str, key: str, expires_s: int, filename: str | None = None) -> str:
        params = {"Bucket": bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = 'attachment; filename="%s"' % filename.replace('"', "")
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)


def translate(e: BaseException, uri: str, source: DataSource, attempts: int | None = None) -> StorageError:
    """What the caller sees when a request failed for good."""
    if isinstance(e, StorageError):
        return e
    where = "%s (data source %r)" % (source.endpoint, source.name)
    if isinstance(e, ClientError):
        code = error_code(e)
        if code in DENIED_CODES:
            return AccessDeniedError(uri, "the store at %s refused the keys (%s); check the data source's access "
                                          "key and secret key" % (where, code))
        if code == "AccessDenied" or http_status(e) == 403:
            return AccessDeniedError(uri, "access denied by %s: the data source's keys may not do this here "
                                          "(%s)" % (where, code))
        if code == "NoSuchBucket":
            bucket = uri[5:].partition("/")[0] if uri.startswith("s3://") else "?"
            return LocationError(uri, "bucket %r does not exist on %s; create it or correct the URI" % (bucket, where))
    if is_transient(e):
        tries = " after %d attempts" % attempts if attempts else ""
        return StoreUnavailableError(uri, "the store at %s is unavailable%s: %s" % (where, tries, describe(e)))
    if isinstance(e, ClientError):
        return StagingError(uri, "the store at %s answered %s" % (where, describe(e)))
    if isinstance(e, BotoCoreError):
        return StagingError(uri, "request to %s failed: %s" % (where, type(e).__name__))
    if isinstance(e, OSError):
        return StagingError(uri, "local error: %s%s" % (e.strerror or e, " (%s)" % e.filename if e.filename else ""))
    return StagingError(uri, "%s: %s" % (type(e).__name__, e))
