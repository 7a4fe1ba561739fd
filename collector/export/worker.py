"""A bounded queue and a thread in front of each exporter.

Collection enqueues and returns at once: a slow or absent backend never
blocks collection. A failed export is retried with exponential backoff while
newer batches queue up behind it. Metrics are cumulative, so when a newer
batch is waiting the failed batch's series that the newer one carries are
superseded (its totals include them); series only the failed batch has, and
its spans and profiles, are retried. Beyond the queue
bound the oldest batch is dropped, and what that loses is counted per signal.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time

log = logging.getLogger("otelbpf.export")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0


def _lost_items(batch) -> dict:
    """What dropping this batch loses, per signal (metrics: nothing a later
    cumulative batch does not carry again, but their resolution)."""
    return {"metrics": sum(len(v) for v in batch.metrics.values()), "spans": len(batch.spans),
            "profiles": sum(len(v) for v in batch.profiles.values())}


def _series_key(record) -> tuple:
    return (record.instrument.name, type(record).__name__, tuple(sorted(record.attributes.items())))


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
        self._failures = 0
        self.delivered = 0
        self._thread = threading.Thread(target=self._run, name=f"export-{self.name}", daemon=True)
        self._thread.start()

    def _drop(self, batch, reason: str) -> None:
        for signal, n in _lost_items(batch).items():
            if n:
                self._counters.drop(f"exporter.{self.name}", f"{reason}.{signal}", n)

    def submit(self, batch) -> None:
        with self._cv:
            if len(self._q) >= self._max:
                self._drop(self._q.popleft(), "queue_full")
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
                if self._q:  # a newer batch is waiting (a backlog, or a retry)
                    batch = self._supersede(batch, self._q[0])
                self._busy = True
            if batch.is_empty():
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                continue
            try:
                ok = self.exporter.export(batch)
            except Exception as e:  # an exporter bug must not kill the worker
                log.warning("exporter %s failed: %s", self.name, e)
                ok = False
            with self._cv:
                self._busy = False
                if ok:
                    self._failures = 0
                    self.delivered += 1
                else:
                    self._counters.drop(f"exporter.{self.name}", "export_failed")  # attempts, not data
                    self._failures += 1
                    self._requeue(batch)
                    if not self._closing:
                        backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
                        self._cv.wait(backoff * random.uniform(0.8, 1.2))
                self._cv.notify_all()

    def _requeue(self, batch) -> None:
        """Put a failed batch back in front, for the next attempt."""
        if len(self._q) >= self._max:
            self._drop(batch, "queue_full")
        else:
            self._q.appendleft(batch)

    @staticmethod
    def _supersede(batch, newer):
        """The series `newer` carries replace this batch's (cumulative totals
        include them); series only this batch has (a process that exited, a
        flow that went idle) are kept, since their last values exist nowhere
        else. Spans and profiles are always kept."""
        present = {(scope, _series_key(r)) for scope, recs in newer.metrics.items() for r in recs}
        kept = {scope: [r for r in recs if (scope, _series_key(r)) not in present]
                for scope, recs in batch.metrics.items()}
        return dataclasses.replace(batch, metrics={k: v for k, v in kept.items() if v})

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been delivered (or timeout)."""
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
            left = list(self._q)
            self._q.clear()
            self._cv.notify_all()
        if not flushed:
            for batch in left:
                self._drop(batch, "shutdown_timeout")
            if left:
                log.warning("exporter %s: %d batches not delivered before shutdown", self.name, len(left))
        self._thread.join(timeout=max(timeout, 0.1))
        try:
            self.exporter.shutdown()
        except Exception as e:
            log.warning("exporter %s: shutdown failed: %s", self.name, e)
