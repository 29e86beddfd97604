"""The transfer engine's worker pool: a fixed number of threads whose tasks may queue more
tasks (a large file queues its parts); the first failure stops everything not yet started.

So at most ``workers`` requests are in flight, whatever the mix of small files, parts and
checks. Used by :class:`storage.transfer.Transfer`.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class Runner:
    """A thread pool whose tasks may queue more tasks; the first failure stops the rest."""

    def __init__(self, workers: int, abort: threading.Event):
        self.abort = abort
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="aiportal-stage")
        self._cv = threading.Condition()
        self._pending = 0
        self.error: BaseException | None = None

    def submit(self, fn: Callable, *args) -> None:
        with self._cv:
            self._pending += 1
        self._pool.submit(self._run, fn, args)

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            if not self.abort.is_set():
                fn(*args)
        except BaseException as e:  # noqa: BLE001 - recorded, re-raised by wait()
            with self._cv:
                if self.error is None:
                    self.error = e
            self.abort.set()
        finally:
            with self._cv:
                self._pending -= 1
                if self._pending == 0:
                    self._cv.notify_all()

    def wait(self) -> None:
        try:
            with self._cv:
                while self._pending:
                    self._cv.wait(0.5)
        except BaseException:
            self.abort.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            raise
        self._pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

