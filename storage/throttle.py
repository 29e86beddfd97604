"""A token bucket: the optional bandwidth cap of a job's transfers, shared by all workers."""
from __future__ import annotations

import threading
import time
from typing import Callable


class TokenBucket:
    """At most ``rate`` bytes per second on average, bursts of up to ``burst`` bytes.

    :meth:`take` may overdraw the bucket (a part is bigger than a burst); the taker then waits
    until the debt is paid back, so the average holds however large the requests are.
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 4)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    @classmethod
    def from_mbps(cls, mbps: float | None, **kw) -> "TokenBucket | None":
        """A bucket for ``mbps`` megabits per second (None or 0: no cap)."""
        return cls(mbps * 1e6 / 8, **kw) if mbps else None

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens now; returns how long the caller must wait before using them."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def take(self, n: int) -> None:
        wait = self.reserve(n)
        if wait > 0:
            self._sleep(wait)
