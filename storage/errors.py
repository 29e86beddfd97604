"""Errors of the storage package.

Every message names the location (a URI or a path) and what to do; none ever contains key
material: errors from the store are reduced to their error code before they are worded.
"""
from __future__ import annotations


class StorageError(Exception):
    """Root of the storage package's errors."""

    code = "storage_error"


class CredentialsError(StorageError):
    """A data-source record, a credentials file or the data key is missing or unusable."""

    code = "bad_credentials"


class StagingError(StorageError):
    """Moving data failed: names the location and why."""

    code = "staging_failed"

    def __init__(self, uri, reason):
        self.uri = uri
        self.reason = reason
        super().__init__("%s: %s" % (uri, reason))


class LocationError(StagingError):
    """A data location is refused before anything moves: bad syntax, unknown scheme, a path
    outside the allowed roots, a missing bucket or prefix."""

    code = "bad_location"


class UnknownSchemeError(LocationError):
    """No registered store handles the location's scheme (:func:`storage.store.store_for`).
    ``known``: the schemes that are registered; ``forms``: how their locations are written."""

    def __init__(self, uri: str, scheme: str, known: tuple[str, ...], forms: tuple[str, ...]):
        self.scheme = scheme
        self.known = known
        self.forms = forms
        super().__init__(uri, "unknown scheme %r; use %s (schemes known here: %s)"
                              % (scheme, " or ".join(forms), ", ".join(known)))


class AccessDeniedError(StagingError):
    """The store refused the data source's keys, or the keys may not do this."""

    code = "access_denied"


class StoreUnavailableError(StagingError):
    """The store kept failing with transient errors (down, resets, 5xx, timeouts) through
    every retry."""

    code = "store_unavailable"


class IntegrityError(StagingError):
    """A file's size or checksum did not match after every retry."""

    code = "integrity_failed"


class StageOutPendingError(StagingError):
    """Stage-out did not finish: the outputs are still in ``source_dir`` on the shared
    filesystem and ``record`` (a JSON file) says where they were going and why they did not."""

    code = "stage_out_pending"

    def __init__(self, uri, reason, source_dir, record):
        self.source_dir = source_dir
        self.record = record
        super().__init__(uri, reason)
