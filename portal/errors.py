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
