"""Errors of the storage package."""
from __future__ import annotations


class StorageError(Exception):
    code = "storage_error"


class StagingError(StorageError):
    """Moving data failed: names the location and why."""

    code = "staging_failed"

    def __init__(self, uri, reason):
        self.uri = uri
        self.reason = reason
        super().__init__("%s: %s" % (uri, reason))
