"""Errors of the monitor package; each names the input and what to do about it."""
from __future__ import annotations


class MonitorError(Exception):
    """Root of the monitor package's errors."""

    code = "monitor_error"


class ParseError(MonitorError):
    """A node file or tool printed something the parser does not understand."""

    code = "monitor_parse_error"

    def __init__(self, text: str, reason: str):
        self.text = text
        super().__init__("cannot parse %r: %s" % (text[:200], reason))


class FaultError(MonitorError):
    """Fault injection (dev cluster only) refused or failed: says why and what to do."""

    code = "fault_injection"
