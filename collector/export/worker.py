"""A bounded queue and a thread in front of each exporter.

Collection enqueues and returns at once. When the backend is slow or down the
queue fills; then the oldest batch is dropped and counted, so memory stays
bounded and the newest data wins.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

log = logging.getLogger("otelbpf.export")


class ExportWorker:
    def __init__(self, exporter, max_batches: int, counters):
        self.exporter = exporter
        self.name = exporter.name
        self._max = max_batches
        self._q: "collections.deque" = collections.deque()
        self._cv = threading.Condition()
        self._counters = counters
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"export-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, batch) -> None:
        with self._cv:
            if len(self._q) >= self._max:
                self._q.popleft()
                self._counters.drop(f"exporter.{self.name}", "queue_full")
            self._q.append(batch)
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._closing:
                    self._cv.wait()
                if not self._q:
                    return
                batch = self._q.popleft()
                self._busy = True
            try:
                ok = self.exporter.export(batch)
            except Exception as e:  # an exporter bug must not kill the worker
                log.warning("exporter %s failed: %s", self.name, e)
                ok = False
            if not ok:
                self._counters.drop(f"exporter.{self.name}", "export_failed")
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been handed to the exporter."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._q or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float) -> None:
        flushed = self.flush(timeout)
        with self._cv:
            self._closing = True
            left = len(self._q)
            self._q.clear()
            self._cv.notify_all()
        if not flushed and left:
            self._counters.drop(f"exporter.{self.name}", "shutdown_timeout", left)
            log.warning("exporter %s: %d batches not delivered before shutdown", self.name, left)
        self._thread.join(timeout=max(timeout, 0.1))
        try:
            self.exporter.shutdown()
        except Exception as e:
            log.warning("exporter %s: shutdown failed: %s", self.name, e)
