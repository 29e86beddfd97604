"""The run loop every portal daemon shares: a cycle every ``interval`` seconds until stopped
(a ``threading.Event``, or SIGTERM/SIGINT when run in the main thread). A failed cycle (Slurm
or the database down) is logged with its traceback and tried again next time: a daemon never
dies of one bad cycle."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

log = logging.getLogger(__name__)


def run_loop(name: str, cycle: Callable[[], str | None], interval: float,
             stop: threading.Event | None = None, pause: Callable[[], float] | None = None) -> None:
    """Run ``cycle`` until ``stop``. ``cycle`` returns a one-line summary to log at INFO (or
    None when there is nothing to say); ``pause`` (default: ``interval``) says how long to wait
    before the next cycle, e.g. a quick one after a cycle that acted."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("%s started, every %.1fs", name, interval)
    while not stop.is_set():
        try:
            summary = cycle()
            if summary:
                log.info("%s cycle: %s", name, summary)
        except Exception:   # noqa: BLE001 -- Slurm or the database down: say so, try again next cycle
            log.exception("%s cycle failed; retrying in %.1fs", name, interval)
        stop.wait(pause() if pause else interval)
    log.info("%s stopped", name)
