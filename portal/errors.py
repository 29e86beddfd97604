"""Errors of the portal layer. Leaf packages have their own roots (slurm.errors.SlurmError);
the API maps all of them to ``{"error": code, "message": ...}`` with a status per class."""
from __future__ import annotations


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
