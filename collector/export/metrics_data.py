"""Records -> OpenTelemetry SDK MetricsData.

Kernel log2 buckets (bucket i: (2^(i-1), 2^i]) map exactly onto an OTLP
exponential histogram at scale 0 with offset i-1, so the exponential form
re-bins nothing. The explicit form (for backends without exponential
histograms) uses the same power-of-two bounds, converting ns to seconds.
"""
from __future__ import annotations

from opentelemetry.sdk.metrics.export import (AggregationTemporality, Buckets, ExponentialHistogram,
                                              ExponentialHistogramDataPoint, Gauge, Histogram,
                                              HistogramDataPoint, Metric, MetricsData, NumberDataPoint,
                                              ResourceMetrics, ScopeMetrics, Sum)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .. import __version__
from ..records import Counter, Gauge as GaugeRecord, Log2Histogram

CUMULATIVE = AggregationTemporality.CUMULATIVE
UNIT_TO_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3}


def exponential_point(h: Log2Histogram, now_ns: int) -> ExponentialHistogramDataPoint:
    counts = list(h.buckets)
    first = next((i for i, c in enumerate(counts) if c), None)
    if first is None:
        positive = Buckets(offset=0, bucket_counts=[])
    else:
        last = max(i for i, c in enumerate(counts) if c)
        # kernel bucket i covers (2^(i-1+e), 2^(i+e)]: OTLP scale-0 index i-1+e
        positive = Buckets(offset=first - 1 + h.exp_offset, bucket_counts=counts[first:last + 1])
    return ExponentialHistogramDataPoint(
        attributes=h.attributes, start_time_unix_nano=h.start_time_ns, time_unix_nano=now_ns,
        count=sum(counts), sum=h.sum, scale=0, zero_count=0, positive=positive,
        negative=Buckets(offset=0, bucket_counts=[]), flags=0, min=None, max=None, exemplars=[])


def explicit_point(h: Log2Histogram, now_ns: int) -> HistogramDataPoint:
    """The record's own explicit bounds when it has them; otherwise bounds
    2^e .. 2^(n-2+e) units (the last kernel bucket is the overflow)."""
    factor = UNIT_TO_SECONDS.get(h.instrument.unit, 1.0)
    if h.explicit_bounds is not None:
        bounds = [float(b) * factor for b in h.explicit_bounds]
        counts = list(h.explicit_counts)
    else:
        bounds = [float(2.0 ** (i + h.exp_offset)) * factor for i in range(len(h.buckets) - 1)]
        counts = list(h.buckets)
    return HistogramDataPoint(
        attributes=h.attributes, start_time_unix_nano=h.start_time_ns, time_unix_nano=now_ns,
        count=sum(counts), sum=h.sum * factor, bucket_counts=counts, explicit_bounds=bounds,
        min=None, max=None, exemplars=[])


def _metric_for(records: list, form: str, now_ns: int) -> Metric:
    first = records[0]
    inst = first.instrument
    if isinstance(first, Log2Histogram):
        if form == "explicit":
            unit = "s" if inst.unit in UNIT_TO_SECONDS else inst.unit
            data = Histogram([explicit_point(r, now_ns) for r in records], CUMULATIVE)
        else:
            unit = inst.unit
            data = ExponentialHistogram([exponential_point(r, now_ns) for r in records], CUMULATIVE)
        return Metric(inst.name, inst.description, unit, data)
    if isinstance(first, Counter):
        pts = [NumberDataPoint(r.attributes, r.start_time_ns, now_ns, r.value, []) for r in records]
        return Metric(inst.name, inst.description, inst.unit, Sum(pts, CUMULATIVE, True))
    if isinstance(first, GaugeRecord):
        pts = [NumberDataPoint(r.attributes, 0, now_ns, r.value, []) for r in records]
        return Metric(inst.name, inst.description, inst.unit, Gauge(pts))
    raise TypeError(f"unknown record type {type(first).__name__}")


def build(resource: Resource, scopes: dict, now_ns: int, form: str = "exponential") -> MetricsData:
    """scopes: scope name -> records. One Metric per instrument per scope."""
    scope_metrics = []
    for scope_name, records in scopes.items():
        by_instrument: dict = {}
        for r in records:
            by_instrument.setdefault((r.instrument, type(r)), []).append(r)
        metrics = [_metric_for(rs, form, now_ns) for rs in by_instrument.values()]
        if metrics:
            scope_metrics.append(ScopeMetrics(InstrumentationScope(scope_name, __version__), metrics, ""))
    return MetricsData([ResourceMetrics(resource, scope_metrics, "")])
