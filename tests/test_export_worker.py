"""The export queue: never blocks the caller, retries with backoff, lets a
newer cumulative batch supersede a failed one's metrics, keeps spans and
profiles for retry, and counts per signal what the bound drops."""
from __future__ import annotations

import random
import threading
import time
import tracemalloc
import types

from collector.export import worker as worker_mod
from collector.export import sizes
from collector.export.spans import SpanConverter
from collector.export.worker import ExportWorker, QueueLimits
from collector.records import Batch, Counter, Frame, Instrument, Log2Histogram, Profile, ProfileSample, Span
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


def _span(name: str):
    return types.SimpleNamespace(name=name, attributes={})


def _batch(i: int, spans=()):
    return Batch(time_ns=i, metrics={"s": [Counter(C, {}, i, 0)]}, spans=[_span(s) for s in spans])


def _limits(batches: int, memory: int = 1 << 30) -> QueueLimits:
    return QueueLimits(batches=batches, memory=memory)


def test_failed_metrics_are_superseded_and_spans_retried(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)
    exp = FlakyExporter(fail_first=2)
    counters = AgentCounters()
    w = ExportWorker(exp, _limits(10), counters)
    w.submit(_batch(1, spans=["span-a"]))
    time.sleep(0.01)
    w.submit(_batch(2))
    assert w.flush(timeout=10)
    w.close(1)
    delivered = exp.calls[2:]
    # the span of batch 1 made it; batch 1's metrics were superseded by batch 2's totals
    assert any([x.name for x in b.spans] == ["span-a"] for b in delivered)
    assert [b.time_ns for b in delivered if b.metrics] == [2]
    assert counters.get("exporter.flaky", "export_failed") == 2
    assert counters.get("exporter.flaky", "queue_full.spans") == 0


def test_series_only_an_old_batch_has_are_kept(monkeypatch):
    """A series that ended (its process exited) is not in newer batches: its
    last value must still be delivered."""
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)
    exp = FlakyExporter(fail_first=1)
    w = ExportWorker(exp, _limits(10), AgentCounters())
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
    w = ExportWorker(exp, _limits(3), counters)
    t0 = time.monotonic()
    for i in range(20):
        w.submit(_batch(i, spans=[f"s{i}"]))
    assert time.monotonic() - t0 < 0.5
    time.sleep(0.2)
    w.close(0.2)
    lost_spans = counters.get("exporter.flaky", "queue_full.spans") + \
        counters.get("exporter.flaky", "shutdown_timeout.spans")
    assert lost_spans == 20  # none delivered, and every one of them counted


class PickyExporter:
    """A backend that takes metrics but rejects spans for a while."""
    name = "picky"
    signal_lanes = True

    def __init__(self, reject_spans: int):
        self.reject_spans = reject_spans
        self.metric_times, self.span_names = [], []
        self.lock = threading.Lock()

    def export(self, batch) -> bool:
        with self.lock:
            assert not (batch.spans and batch.metrics), "a lane carries one signal"
            if batch.spans:
                if self.reject_spans > 0:
                    self.reject_spans -= 1
                    return False
                self.span_names += [s.name for s in batch.spans]
            else:
                self.metric_times.append(batch.time_ns)
            return True

    def shutdown(self):
        pass


def test_a_rejected_signal_neither_holds_back_nor_duplicates_the_others(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)
    exp = PickyExporter(reject_spans=3)
    counters = AgentCounters()
    w = ExportWorker(exp, _limits(10), counters)
    for i in range(3):
        w.submit(_batch(i, spans=[f"s{i}"]))
        time.sleep(0.1)  # each tick's metrics go out before the next (else the newer supersedes them)
    assert w.flush(timeout=10)
    w.close(1)
    assert exp.metric_times == [0, 1, 2]          # each tick's metrics once, in order
    assert sorted(exp.span_names) == ["s0", "s1", "s2"]  # every span, once, after the retries
    assert counters.get("exporter.picky", "export_failed") == 3


def test_the_memory_bound_drops_the_oldest_and_counts_them(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 10)  # a backend that stays down
    exp = PickyExporter(reject_spans=10 ** 9)
    counters = AgentCounters()
    per_batch = sizes.batch_bytes(Batch(0, spans=[_span("x")] * 100))
    w = ExportWorker(exp, _limits(1000, memory=5 * per_batch), counters)
    for i in range(20):
        w.submit(Batch(i, spans=[_span(f"s{i}")] * 100))
    lane = w.lanes["spans"]
    assert lane.queued_bytes <= 5 * per_batch
    dropped = counters.get("exporter.picky", "queue_full.spans")
    assert 14 * 100 <= dropped <= 15 * 100  # 5 held (one of them in flight), the rest counted
    w.close(0.1)


def _measured_and_estimated(make, put):
    make(20)  # warm the caches (interned strings, the span resource) first
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    items = make(2000)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    batch = Batch(0)
    put(batch, items)
    return used, sizes.batch_bytes(batch)


def test_the_size_estimate_tracks_real_memory_within_a_factor_of_two():
    """The memory bound is only as good as the estimate: compare it with
    what tracemalloc sees for records like the probes make."""
    from opentelemetry.sdk.resources import Resource
    inst = Instrument("http.server.request.duration", "s", "")
    conv, base = SpanConverter(), Resource({"service.name": "otelbpf"})
    frames = [Frame(f"fn{i}", 0x1000 + i) for i in range(64)]

    def hists(n):
        return [Log2Histogram(inst, {"http.request.method": "GET", "http.route": f"/users/{i}",
                                     "http.response.status_code": 200, "process.pid": 1000 + i},
                              [random.randint(0, 9) for _ in range(40)], 1.0, 0) for i in range(n)]

    def spans(n):
        return conv.convert([Span("GET /users/*", "server", random.getrandbits(128), random.getrandbits(64), None,
                                  1, 2, {"url.path": f"/users/{i}", "http.request.method": "GET",
                                         "http.response.status_code": 200, "network.peer.port": 40000 + i,
                                         "process.pid": 7, "process.executable.name": "nginx"})
                             for i in range(n)], base)

    def profiles(n):
        return [Profile([ProfileSample({"process.pid": i}, frames[: 8 + i % 50], 1) for i in range(n)], 0, 1, 1)]

    cases = {"metrics": (hists, lambda b, x: b.metrics.update(m=x)),
             "spans": (spans, lambda b, x: b.spans.extend(x)),
             "profiles": (profiles, lambda b, x: b.profiles.update(p=x))}
    for signal, (make, put) in cases.items():
        used, estimated = _measured_and_estimated(make, put)
        assert 0.5 < estimated / used < 2.0, f"{signal}: estimated {estimated} B, tracemalloc {used} B"


def test_a_batch_refused_for_good_expires_and_frees_its_lane(monkeypatch):
    monkeypatch.setattr(worker_mod, "BACKOFF_FIRST_S", 0.05)

    class Poisoned(PickyExporter):
        def export(self, batch) -> bool:
            if any(s.name == "bad" for s in batch.spans):
                return False
            return super().export(batch)

    exp = Poisoned(reject_spans=0)
    counters = AgentCounters()
    w = ExportWorker(exp, QueueLimits(batches=10, memory=1 << 30, retry_max_s=0.3), counters)
    w.submit(_batch(1, spans=["bad", "innocent"]))
    time.sleep(0.01)
    w.submit(_batch(2, spans=["later"]))
    assert w.flush(timeout=10)
    w.close(1)
    assert exp.span_names == ["later"]
    assert counters.get("exporter.picky", "retry_expired.spans") == 2  # the whole refused batch, counted
    assert counters.get("exporter.picky", "export_failed") >= 3  # retried first: it might have been transient
