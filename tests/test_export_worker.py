"""The export queue: never blocks the caller, retries with backoff, lets a
newer cumulative batch supersede a failed one's metrics, keeps spans and
profiles for retry, and counts per signal what the bound drops."""
from __future__ import annotations

import threading
import time

from collector.export import worker as worker_mod
from collector.export.worker import ExportWorker
from collector.records import Batch, Counter, Instrument
from collector.selftelemetry import AgentCounters

C = Instrument("t.c", "1", "")


class FlakyExporter:
    name = "flaky"

    def __init__(self, fail_first: int):
        self.fail_first = fail_first
        self.calls = []
        self.lock = threading.Lock()

    def export(self, batch) -> bool:
        with self.lock:
            self.calls.append(batch)
            return len(self.calls) > self.fail_first

    def shutdown(self):
        pass


def _batch(i: int, spans=()):
    return Batch(time_ns=i, metrics={"s": [Counter(C, {}, i, 0)]}, spans=list(spans))


def test_failed_metrics_are_superseded_and_spans_retried(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)
    exp = FlakyExporter(fail_first=2)
    counters = AgentCounters()
    w = ExportWorker(exp, max_batches=10, counters=counters)
    w.submit(_batch(1, spans=["span-a"]))
    time.sleep(0.01)
    w.submit(_batch(2))
    assert w.flush(timeout=10)
    w.close(1)
    delivered = exp.calls[2:]
    # the span of batch 1 made it; batch 1's metrics were superseded by batch 2's totals
    assert any(b.spans == ["span-a"] for b in delivered)
    assert [b.time_ns for b in delivered if b.metrics] == [2]
    assert counters.get("exporter.flaky", "export_failed") == 2
    assert counters.get("exporter.flaky", "queue_full.spans") == 0


def test_series_only_an_old_batch_has_are_kept(monkeypatch):
    """A series that ended (its process exited) is not in newer batches: its
    last value must still be delivered."""
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)
    exp = FlakyExporter(fail_first=1)
    w = ExportWorker(exp, max_batches=10, counters=AgentCounters())
    old = Batch(time_ns=1, metrics={"s": [Counter(C, {"pid": 1}, 5, 0), Counter(C, {"pid": 2}, 7, 0)]})
    new = Batch(time_ns=2, metrics={"s": [Counter(C, {"pid": 2}, 9, 0)]})
    w.submit(old)
    time.sleep(0.01)
    w.submit(new)
    assert w.flush(timeout=10)
    w.close(1)
    delivered = [(b.time_ns, r.attributes["pid"], r.value) for b in exp.calls[1:] for r in b.metrics.get("s", [])]
    assert sorted(delivered) == [(1, 1, 5), (2, 2, 9)]


def test_submit_never_blocks_and_the_bound_counts_losses(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 10)  # a backend that stays down
    exp = FlakyExporter(fail_first=10 ** 9)
    counters = AgentCounters()
    w = ExportWorker(exp, max_batches=3, counters=counters)
    t0 = time.monotonic()
    for i in range(20):
        w.submit(_batch(i, spans=[f"s{i}"]))
    assert time.monotonic() - t0 < 0.5
    time.sleep(0.2)
    w.close(0.2)
    lost_spans = counters.get("exporter.flaky", "queue_full.spans") + \
        counters.get("exporter.flaky", "shutdown_timeout.spans")
    assert lost_spans == 20  # none delivered, and every one of them counted
