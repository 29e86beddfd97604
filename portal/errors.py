"""Errors of the portal layer, and the one mapping of every error (ours and the leaf
packages': ``slurm.errors.SlurmError``, ``storage.errors.StorageError``, ...) to an error code and
an HTTP status (:func:`error_status`). The API answers ``{"error": code, "message": ...}`` with it;
the pages show the same code and status."""
from __future__ import annotations

from containers.errors import ContainerError, ImageRefError
from containers.registry import RegistryAuthError, RegistryError, RegistryNotFound, RegistryUnavailable
from inference.errors import InferenceError
from slurm.errors import SlurmError, SpecError, SubmitError
from storage.errors import StorageError


class PortalError(Exception):
    """Root of the portal's own errors."""

    code = "portal_error"
    status = 500


class ConfigError(PortalError):
    """Settings are missing or invalid; raised at start-up."""

    code = "config_error"


class AuthError(PortalError):
    code = "unauthorized"
    status = 401


class ValidationError(PortalError):
    """A request field is invalid: ``field`` names it, the message says how to fix it."""

    code = "invalid"
    status = 422

    def __init__(self, field: str, message: str, errors: dict[str, str] | None = None):
        super().__init__("%s: %s" % (field, message))
        self.field = field
        self.detail = message
        #: every invalid field and its message (a form shows each next to its field)
        self.errors = dict(errors) if errors else {field: message}

    @classmethod
    def of(cls, errors: dict[str, str]) -> "ValidationError":
        first = next(iter(errors))
        err = cls(first, errors[first], errors)
        err.args = ("; ".join("%s: %s" % kv for kv in errors.items()),)
        return err


class NotFoundError(PortalError):
    """Does not exist, or belongs to someone else (the two are not told apart)."""

    code = "not_found"
    status = 404

    @classmethod
    def of(cls, what: str, hint: str = "") -> "NotFoundError":
        """The one answer for a missing object and another user's: ``WHAT: not found, or not yours``."""
        return cls("%s: not found, or not yours%s" % (what, " (%s)" % hint if hint else ""))


class ForbiddenError(PortalError):
    code = "forbidden"
    status = 403


class ConflictError(PortalError):
    code = "conflict"
    status = 409


class RateLimitError(PortalError):
    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after: int = 60):
        super().__init__(message)
        self.retry_after = retry_after


class LogTailError(PortalError):
    """A job log cannot be read over SSH (sshd down, host key or login refused, no access)."""

    code = "log_unavailable"
    status = 503

    def __init__(self, host: str, user: str, path: str, reason: str, fix: str = ""):
        fix = fix or ("check that the log sshd (ansible role log_sshd) runs on %s and that the "
                      "portal's key is authorized in ~%s/.ssh/authorized_keys" % (host, user))
        super().__init__("cannot read log %s as %s on %s: %s; %s" % (path, user, host, reason, fix))
        self.host, self.user, self.path, self.reason = host, user, path, reason


#: HTTP status of each storage error code (the data layer's errors name the location and the fix)
STORAGE_STATUS = {"bad_location": 400, "bad_credentials": 400, "access_denied": 403,
                  "store_unavailable": 503, "integrity_failed": 502, "staging_failed": 502,
                  "stage_out_pending": 502}

#: the error roots the web and API error handlers catch
HANDLED = (SlurmError, StorageError, ContainerError, InferenceError, PortalError)


def error_status(e: Exception) -> tuple[str, int]:
    """The error code and HTTP status of one of our exceptions (anything else: internal, 500)."""
    if isinstance(e, (SpecError, SubmitError, ImageRefError)):
        return e.code, 422
    if isinstance(e, SlurmError):
        return e.code, 503
    if isinstance(e, StorageError):
        return e.code, STORAGE_STATUS.get(e.code, 400)
    if isinstance(e, RegistryUnavailable):
        return e.code, 503
    if isinstance(e, RegistryError):
        return e.code, 422 if isinstance(e, (RegistryAuthError, RegistryNotFound)) else 502
    if isinstance(e, ContainerError):
        return e.code, 500
    if isinstance(e, (InferenceError, PortalError)):
        return e.code, e.status
    return "internal", 500
