"""Data locations: shared-filesystem paths and ``s3://bucket/prefix``."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from storage.errors import StagingError


class Scheme(enum.Enum):
    SHARED = "shared"
    S3 = "s3"


@dataclass(frozen=True)
class DataLocation:
    scheme: Scheme
    path: str            # absolute path (SHARED) or "bucket/prefix" (S3)
    original: str


def parse_location(text: str) -> DataLocation:
    if not text or "\0" in text or "\n" in text:
        raise StagingError(text, "a data location is an absolute path or s3://bucket/prefix")
    if text.startswith("s3://"):
        rest = text[5:]
        if not rest or rest.startswith("/"):
            raise StagingError(text, "name the bucket: s3://bucket/prefix")
        return DataLocation(Scheme.S3, rest, text)
    if text.startswith("file://"):
        text = text[7:]
    if "://" in text:
        raise StagingError(text, "unknown scheme; use an absolute path on the shared filesystem or s3://bucket/prefix")
    if not text.startswith("/"):
        raise StagingError(text, "relative paths are ambiguous on compute nodes; give an absolute path")
    return DataLocation(Scheme.SHARED, text, text)
