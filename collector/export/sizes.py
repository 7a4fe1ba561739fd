"""Memory a queued batch holds, estimated from what it contains.

Walking objects with sys.getsizeof on every tick would cost more than the
export; these per-item figures were fitted against tracemalloc for the
records the probes make (tests/test_export_worker.py checks they stay within
a factor of two), which is what a memory bound on a queue needs.
"""
from __future__ import annotations

RECORD_BYTES = 250      # a metric record: dataclass, attribute dict, value
ATTRIBUTE_BYTES = 35    # one dict entry (keys are shared strings) plus its value's own characters
HISTOGRAM_BUCKET_BYTES = 10
SPAN_BYTES = 500        # ReadableSpan, its contexts and attribute wrapper (the resource is shared)
SAMPLE_BYTES = 340      # a profile sample; frames are shared with the symbol cache
FRAME_REF_BYTES = 8


def _attributes(attrs) -> int:
    n = 0
    for v in attrs.values():
        n += ATTRIBUTE_BYTES + (len(v) if isinstance(v, str) else 0)
    return n


def record_bytes(record) -> int:
    n = RECORD_BYTES + _attributes(record.attributes)
    buckets = getattr(record, "buckets", None)
    if buckets is not None:
        n += HISTOGRAM_BUCKET_BYTES * (len(buckets) + len(getattr(record, "explicit_counts", None) or ()))
    return n


def span_bytes(span) -> int:
    return SPAN_BYTES + _attributes(span.attributes or {})


def profile_bytes(profile) -> int:
    return RECORD_BYTES + sum(SAMPLE_BYTES + FRAME_REF_BYTES * len(s.frames) + _attributes(s.attributes)
                              for s in profile.samples)


def batch_bytes(batch) -> int:
    n = sum(record_bytes(r) for recs in batch.metrics.values() for r in recs)
    n += sum(span_bytes(s) for s in batch.spans)
    n += sum(profile_bytes(p) for recs in batch.profiles.values() for p in recs)
    return n
