"""Retries with exponential backoff, and which errors are worth retrying (one table).

Transient: the store is unreachable (connection refused or reset, timeouts, a response cut
short) or answers 5xx / throttling codes. Everything else (refused keys, a missing bucket, a
bad request) fails at once with a message that says what to fix.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, IncompleteReadError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Error codes (from the S3 error XML) that are retried whatever the HTTP status says.
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                             "Throttling", "ThrottlingException", "RequestThrottled", "OperationAborted",
                             "500", "502", "503", "504"})


class ShortTransfer(Exception):
    """A body ended early or a part's bytes did not add up: retried like a reset connection."""


def error_code(e: BaseException) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return type(e).__name__


def http_status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` is worth another try."""
    if isinstance(e, ClientError):
        return http_status(e) >= 500 or error_code(e) in TRANSIENT_CODES
    if isinstance(e, (HTTPClientError, BotoConnectionError, IncompleteReadError, ShortTransfer,
                      ConnectionError, TimeoutError)):
        return True
    return isinstance(e, BotoCoreError) and "timeout" in type(e).__name__.lower()


def describe(e: BaseException) -> str:
    """A short description without anything the server or the request might have echoed."""
    if isinstance(e, ClientError):
        return "%s (HTTP %s)" % (error_code(e), http_status(e) or "?")
    if isinstance(e, (BotoConnectionError, HTTPClientError)):
        return "%s: %s" % (type(e).__name__, e)
    return "%s: %s" % (type(e).__name__, e)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; between them ``base_s``, 2x, 4x ... capped at ``cap_s``, each
    with "equal jitter" (half fixed, half random) so parallel workers do not retry in step.
    The defaults give up after ~15 s of waiting: a job has 30 s (Slurm's KillWait) to stage
    out after SIGTERM."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 8.0

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        d = min(self.cap_s, self.base_s * (2 ** (retry - 1)))
        return d / 2 + d / 2 * rng()

    def call(self, fn: Callable[[], T], what: str, abort: threading.Event | None = None,
             on_retry: Callable[[BaseException, int, float], None] | None = None,
             sleep: Callable[[float], object] | None = None) -> T:
        """Run ``fn`` until it succeeds, fails permanently or runs out of attempts (the last
        error is raised). Waits end early when ``abort`` is set."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if not is_transient(e) or attempt == self.attempts or (abort is not None and abort.is_set()):
                    raise
                wait = self.delay(attempt)
                log.info("%s: %s; retry %d of %d in %.1f s", what, describe(e), attempt, self.attempts - 1, wait)
                if on_retry is not None:
                    on_retry(e, attempt, wait)
                if sleep is not None:
                    sleep(wait)
                elif abort is not None:
                    if abort.wait(wait):
                        raise
                else:
                    time.sleep(wait)
        raise AssertionError("unreachable")
