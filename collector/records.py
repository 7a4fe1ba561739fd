"""Typed records: what probes hand to the agent.

Probes report cumulative values (since their start) keyed by attributes; the
export layer turns them into OpenTelemetry data. A probe never talks to an
exporter, and an exporter never knows which probe produced a record.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Instrument:
    name: str
    unit: str
    description: str


@dataclass
class Log2Histogram:
    """A cumulative log2 histogram: buckets[i] counts values v in
    (2^(i-1+e), 2^(i+e)] instrument units, e = exp_offset (buckets[0]: v <= 2^e).

    explicit: optionally the same values counted against explicit bounds
    (in instrument units; len(counts) == len(bounds) + 1), exported instead
    of power-of-two bounds where the explicit form is asked for."""
    instrument: Instrument
    attributes: dict
    buckets: list
    sum: float
    start_time_ns: int
    exp_offset: int = 0
    explicit_bounds: Optional[tuple] = None
    explicit_counts: Optional[list] = None

    @property
    def count(self) -> int:
        return sum(self.buckets)


@dataclass
class Counter:
    """A cumulative, monotonic sum."""
    instrument: Instrument
    attributes: dict
    value: float
    start_time_ns: int


@dataclass
class Gauge:
    instrument: Instrument
    attributes: dict
    value: float


@dataclass(frozen=True)
class Frame:
    """One stack frame. mapping: a collector.symbolize.procmaps.MappingInfo for
    file-backed code (kept even when function is None, so a backend can
    symbolize later); None for kernel and anonymous code.

    An interpreted frame (frame_type: its profile.frame.type, e.g. "cpython")
    has no machine address: `address` identifies its code object, and its
    source is `file` and `line` (0: unknown)."""
    function: Optional[str]
    address: int
    mapping: Optional[object] = None
    kernel: bool = False
    file: Optional[str] = None
    line: int = 0
    frame_type: Optional[str] = None


@dataclass
class ProfileSample:
    """link: (trace_id, span_id) of the request the sampled thread was
    serving (128- and 64-bit ints, both non-zero), or None outside any
    request. A linked sample also carries "http.route" and
    "http.request.method" among its attributes."""
    attributes: dict
    frames: list   # leaf first
    count: int
    link: Optional[tuple] = None


@dataclass
class Profile:
    """Samples aggregated over [start_time_ns, start_time_ns + duration_ns)."""
    samples: list
    start_time_ns: int
    duration_ns: int
    period_ns: int
    sample_type: tuple = ("samples", "count")
    period_type: tuple = ("cpu", "nanoseconds")


@dataclass
class Span:
    """One finished operation (an HTTP request...), timed by the kernel.
    Resource-like attributes (process.*, container.*, k8s.*) are moved to the
    span's resource on export; the rest stay on the span."""
    name: str
    kind: str                 # "server" | "client" | "internal"
    trace_id: int             # 128 bits
    span_id: int              # 64 bits
    parent_span_id: Optional[int]
    start_time_ns: int
    end_time_ns: int
    attributes: dict
    error: bool = False


@dataclass
class Batch:
    """Everything one collection tick produced, ready for the exporters."""
    time_ns: int
    resource: object = None                       # opentelemetry.sdk.resources.Resource
    metrics: dict = field(default_factory=dict)   # scope name -> list of metric records
    spans: list = field(default_factory=list)     # SDK ReadableSpans (from Span records)
    profiles: dict = field(default_factory=dict)  # scope name -> list of Profile

    def is_empty(self) -> bool:
        return not any(self.metrics.values()) and not self.spans and not any(self.profiles.values())
