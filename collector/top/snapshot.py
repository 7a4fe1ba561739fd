"""The latest collection as plain JSON: every metric record and profile
sample one tick produced, exporter-independent and bounded in size, for
`otelbpf top` (and anyone else who wants the raw numbers)."""
from __future__ import annotations

from ..records import Counter, Gauge, Log2Histogram

VERSION = 1
MAX_METRICS = 20000       # records; a max_series-bounded agent rarely has more
MAX_SAMPLES = 5000        # profile samples, the heaviest kept
MAX_FRAMES = 64           # per sample, leaf first


def _value(v):
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def _attrs(a: dict) -> dict:
    return {str(k): _value(v) for k, v in a.items()}


def _metric(scope: str, r) -> dict | None:
    base = {"scope": scope, "name": r.instrument.name, "unit": r.instrument.unit,
            "attributes": _attrs(r.attributes)}
    if isinstance(r, Log2Histogram):
        buckets = list(r.buckets)
        while buckets and not buckets[-1]:
            buckets.pop()   # trailing empty buckets carry nothing
        return {**base, "kind": "histogram", "buckets": buckets, "exp_offset": r.exp_offset, "sum": r.sum,
                "count": sum(buckets), "start_time_ns": r.start_time_ns}
    if isinstance(r, Counter):
        return {**base, "kind": "counter", "value": r.value, "start_time_ns": r.start_time_ns}
    if isinstance(r, Gauge):
        return {**base, "kind": "gauge", "value": r.value}
    return None


def _frame_name(f) -> str:
    if f.function:
        return f.function
    path = getattr(f.mapping, "path", None)
    return f"[{path.rsplit('/', 1)[-1]}]" if path else ("[kernel]" if f.kernel else "[unknown]")


def empty(interval: float) -> dict:
    """Before the first collection."""
    return {"version": VERSION, "time_ns": None, "interval": interval, "metrics": [], "profiles": [], "samples": [],
            "truncated": {"metrics": 0, "samples": 0}}


def snapshot(batch, interval: float) -> dict:
    """batch: a collector.records.Batch. interval: the agent's collection period (s)."""
    metrics, dropped_metrics = [], 0
    for scope, records in batch.metrics.items():
        for r in records:
            m = _metric(scope, r)
            if m is None:
                continue
            if len(metrics) < MAX_METRICS:
                metrics.append(m)
            else:
                dropped_metrics += 1
    merged: dict = {}
    profiles = []
    for scope, profs in batch.profiles.items():
        for p in profs:
            profiles.append({"scope": scope, "start_time_ns": p.start_time_ns, "duration_ns": p.duration_ns,
                             "period_ns": p.period_ns})
            for s in p.samples:
                # samples apart only by their request's ids (a link, which
                # the view has no use for) are one: one request's few
                # samples would otherwise be the first cut below
                attrs = _attrs(s.attributes)
                frames = [_frame_name(f) for f in s.frames[:MAX_FRAMES]]
                key = (scope, tuple(sorted(attrs.items())), tuple(frames))
                got = merged.get(key)
                if got is None:
                    merged[key] = {"scope": scope, "count": s.count, "attributes": attrs, "frames": frames}
                else:
                    got["count"] += s.count
    samples = sorted(merged.values(), key=lambda x: x["count"], reverse=True)
    kept = samples[:MAX_SAMPLES]
    return {"version": VERSION, "time_ns": batch.time_ns, "interval": interval, "metrics": metrics,
            "profiles": profiles, "samples": kept,
            "truncated": {"metrics": dropped_metrics, "samples": max(0, len(samples) - MAX_SAMPLES)}}
