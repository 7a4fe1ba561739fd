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
    (2^(i-1), 2^i] instrument units (buckets[0]: v <= 1)."""
    instrument: Instrument
    attributes: dict
    buckets: list
    sum: float
    start_time_ns: int

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
    symbolize later); None for kernel and anonymous code."""
    function: Optional[str]
    address: int
    mapping: Optional[object] = None
    kernel: bool = False


@dataclass
class ProfileSample:
    attributes: dict
    frames: list   # leaf first
    count: int


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
class Batch:
    """Everything one collection tick produced, ready for the exporters."""
    time_ns: int
    resource: object = None                       # opentelemetry.sdk.resources.Resource
    metrics: dict = field(default_factory=dict)   # scope name -> list of metric records
    spans: list = field(default_factory=list)     # SDK ReadableSpans
    profiles: dict = field(default_factory=dict)  # scope name -> list of Profile

    def is_empty(self) -> bool:
        return not any(self.metrics.values()) and not self.spans and not any(self.profiles.values())
