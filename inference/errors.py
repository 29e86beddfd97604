"""Errors of the inference tier; each names what failed and how to fix it."""
from __future__ import annotations


class InferenceError(Exception):
    """Root of the inference package's errors."""

    code = "inference_error"
    status = 500


class ServiceSpecError(InferenceError):
    """A service field is invalid: ``field`` names it."""

    code = "invalid"
    status = 422

    def __init__(self, field: str, message: str):
        super().__init__("%s: %s" % (field, message))
        self.field, self.detail = field, message


class NoReadyReplica(InferenceError):
    """The router has no replica to send a request to."""

    code = "no_ready_replica"
    status = 503


class ReplicaUnreachable(InferenceError):
    """Every ready replica refused or dropped the connection."""

    code = "replicas_unreachable"
    status = 502


class EndpointError(InferenceError):
    """An endpoint.json file is missing, half-written or not the replica's."""

    code = "bad_endpoint"
