"""Progress lines for the job log: files, bytes, rate and ETA, at most every few seconds."""
from __future__ import annotations

import threading
import time
from typing import Callable


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1000.0
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return "%d s" % s
    if s < 3600:
        return "%d min %02d s" % divmod(s, 60)
    h, rest = divmod(s, 3600)
    return "%d h %02d min" % (h, rest // 60)


class Progress:
    """Counts what is done against totals (set once the plan is known) and calls ``emit`` with
    one line at most every ``interval`` seconds. Thread-safe; ``clock`` is injectable."""

    def __init__(self, label: str, emit: Callable[[str], object], interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self.total_files = 0
        self.total_bytes = 0
        self.files_done = 0
        self.bytes_done = 0          # bytes moved or found identical
        self.bytes_moved = 0         # bytes actually sent or received (the rate)
        self._t0 = clock()
        self._last = self._t0
        self._lock = threading.Lock()

    def set_totals(self, files: int, nbytes: int) -> None:
        with self._lock:
            self.total_files, self.total_bytes = files, nbytes

    def moved(self, n: int) -> None:
        with self._lock:
            self.bytes_moved += n
            self.bytes_done += n
        self._maybe_emit()

    def file_done(self, skipped_bytes: int = 0) -> None:
        """One file finished; ``skipped_bytes`` counts toward the total when it was already there."""
        with self._lock:
            self.files_done += 1
            self.bytes_done += skipped_bytes
        self._maybe_emit()

    def found(self, n: int) -> None:
        """Bytes already at the destination (a part a resumed upload need not send)."""
        with self._lock:
            self.bytes_done += n
        self._maybe_emit()

    def unmoved(self, n: int) -> None:
        """Bytes sent again after a failed attempt are not progress."""
        with self._lock:
            self.bytes_moved -= n
            self.bytes_done -= n

    def line(self) -> str:
        with self._lock:
            elapsed = max(self.clock() - self._t0, 1e-9)
            rate = self.bytes_moved / elapsed
            left = max(self.total_bytes - self.bytes_done, 0)
            pct = 100.0 * self.bytes_done / self.total_bytes if self.total_bytes else 100.0
            eta = human_seconds(left / rate) if rate > 0 else "?"
            return "%s: %d/%d files, %s/%s (%.0f%%), %s/s, ETA %s" % (
                self.label, self.files_done, self.total_files, human_bytes(self.bytes_done),
                human_bytes(self.total_bytes), pct, human_bytes(rate), eta)

    def _maybe_emit(self) -> None:
        now = self.clock()
        with self._lock:
            if now - self._last < self.interval:
                return
            self._last = now
        self.emit(self.line())
