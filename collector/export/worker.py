"""Bounded queues and threads in front of each exporter.

Collection enqueues and returns at once: a slow or absent backend never
blocks collection. An exporter that sends each signal on its own (OTLP,
file) gets one lane per signal, so a backend that takes metrics but rejects
spans neither holds metrics back nor gets the metrics twice, and each signal
has its own bound. A failed export is retried with exponential backoff while
newer batches queue up behind it. Metrics are cumulative, so when a newer
batch is waiting the failed batch's series that the newer one carries are
superseded (its totals include them); series only the failed batch has, and
spans and profiles, are retried. Beyond a lane's bound (batches, and an
estimate of their memory) the oldest batch is dropped, and what that loses
is counted per signal. A batch that keeps failing for `retry_max_s` (a
backend rejecting it for good: HTTP 400, INVALID_ARGUMENT) is dropped and
counted, so it cannot hold its lane back until the bound pushes it out.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time

from . import sizes

log = logging.getLogger("otelbpf.export")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
SIGNALS = ("metrics", "spans", "profiles")


@dataclasses.dataclass(frozen=True)
class QueueLimits:
    batches: int
    memory: int               # bytes, estimated with export.sizes
    retry_max_s: float = 300  # a batch still failing after this long is dropped


def _lost_items(batch) -> dict:
    """What dropping this batch loses, per signal (metrics: nothing a later
    cumulative batch does not carry again, but their resolution)."""
    return {"metrics": sum(len(v) for v in batch.metrics.values()), "spans": len(batch.spans),
            "profiles": sum(len(v) for v in batch.profiles.values())}


def _series_key(record) -> tuple:
    return (record.instrument.name, type(record).__name__, tuple(sorted(record.attributes.items())))


def split_by_signal(batch) -> dict:
    """signal -> a batch holding only that signal (empty signals left out)."""
    empty = {"metrics": {}, "spans": [], "profiles": {}}
    parts = {}
    for signal in SIGNALS:
        if (any(getattr(batch, signal).values()) if signal != "spans" else batch.spans):
            parts[signal] = dataclasses.replace(batch, **{s: (getattr(batch, s) if s == signal else empty[s])
                                                         for s in SIGNALS})
    return parts


class _Lane:
    """One queue, one thread: the batches of one signal (or of all, for an
    exporter that takes a tick whole) on their way to one exporter."""

    def __init__(self, exporter, name: str, limits: QueueLimits, counters):
        self.exporter = exporter
        self.name = name
        self._limits = limits
        self._q: "collections.deque" = collections.deque()  # (batch, estimated bytes)
        self._bytes = 0
        self._cv = threading.Condition()
        self._counters = counters
        self._closing = False
        self._busy = False
        self._failures = 0
        self._failing_since = None  # monotonic time of the head batch's first failure
        self.delivered = 0
        self._thread = threading.Thread(target=self._run, name=f"export-{name}", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def _drop(self, batch, reason: str) -> None:
        for signal, n in _lost_items(batch).items():
            if n:
                self._counters.drop(f"exporter.{self.exporter.name}", f"{reason}.{signal}", n)

    def _pop_oldest(self):
        batch, size = self._q.popleft()
        self._bytes -= size
        return batch

    def _over_bound(self, incoming: int) -> bool:
        return self._q and (len(self._q) >= self._limits.batches or self._bytes + incoming > self._limits.memory)

    def submit(self, batch) -> None:
        size = sizes.batch_bytes(batch)
        with self._cv:
            while self._over_bound(size):
                self._drop(self._pop_oldest(), "queue_full")
            self._q.append((batch, size))
            self._bytes += size
            self._cv.notify()

    def _export(self, batch) -> bool:
        try:
            return self.exporter.export(batch)
        except Exception as e:  # an exporter bug must not kill the lane
            log.warning("exporter %s failed: %s", self.exporter.name, e)
            return False

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._closing:
                    self._cv.wait()
                if not self._q:
                    return
                batch = self._pop_oldest()
                if self._q:  # a newer batch is waiting (a backlog, or a retry)
                    batch = self._supersede(batch, self._q[0][0])
                self._busy = True
            if batch.is_empty():
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
                continue
            ok = self._export(batch)
            with self._cv:
                self._busy = False
                if ok:
                    self._failures = 0
                    self._failing_since = None
                    self.delivered += 1
                else:
                    self._counters.drop(f"exporter.{self.exporter.name}", "export_failed")  # attempts, not data
                    self._failures += 1
                    now = time.monotonic()
                    if self._failing_since is None:
                        self._failing_since = now
                    if now - self._failing_since >= self._limits.retry_max_s:
                        self._drop(batch, "retry_expired")
                        self._failing_since = None  # the next batch gets its own budget
                    else:
                        self._requeue(batch)
                    if not self._closing:
                        backoff = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
                        self._cv.wait(backoff * random.uniform(0.8, 1.2))
                self._cv.notify_all()

    def _requeue(self, batch) -> None:
        """Put a failed batch back in front, for the next attempt."""
        size = sizes.batch_bytes(batch)
        if self._over_bound(size):
            self._drop(batch, "queue_full")
        else:
            self._q.appendleft((batch, size))
            self._bytes += size

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

    def flush(self, deadline: float) -> bool:
        """Wait until everything queued has been delivered (or the deadline)."""
        with self._cv:
            while self._q or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, deadline: float) -> int:
        """Stop after a flush until the deadline; returns batches left undelivered."""
        flushed = self.flush(deadline)
        with self._cv:
            self._closing = True
            left = [b for b, _ in self._q]
            self._q.clear()
            self._bytes = 0
            self._cv.notify_all()
        if not flushed:
            for batch in left:
                self._drop(batch, "shutdown_timeout")
        self._thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        return len(left) if not flushed else 0


class ExportWorker:
    """One exporter behind its lanes. An exporter with `signal_lanes = True`
    gets a lane per signal; others (the console, which renders a tick whole)
    get one lane and the whole batch."""

    def __init__(self, exporter, limits: QueueLimits, counters):
        self.exporter = exporter
        self.name = exporter.name
        self._per_signal = bool(getattr(exporter, "signal_lanes", False))
        if self._per_signal:
            self.lanes = {s: _Lane(exporter, f"{self.name}-{s}", limits, counters) for s in SIGNALS}
        else:
            self.lanes = {"all": _Lane(exporter, self.name, limits, counters)}

    @property
    def delivered(self) -> int:
        return sum(lane.delivered for lane in self.lanes.values())

    def submit(self, batch) -> None:
        if not self._per_signal:
            self.lanes["all"].submit(batch)
            return
        for signal, part in split_by_signal(batch).items():
            self.lanes[signal].submit(part)

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all([lane.flush(deadline) for lane in self.lanes.values()])

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        left = sum(lane.close(deadline) for lane in self.lanes.values())
        if left:
            log.warning("exporter %s: %d batches not delivered before shutdown", self.name, left)
        try:
            self.exporter.shutdown()
        except Exception as e:
            log.warning("exporter %s: shutdown failed: %s", self.name, e)
