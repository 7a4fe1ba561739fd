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


@dataclass
class Batch:
    """Everything one collection tick produced, ready for the exporters."""
    time_ns: int
    resource: object = None                       # opentelemetry.sdk.resources.Resource
    metrics: dict = field(default_factory=dict)   # scope name -> list of metric records
    spans: list = field(default_factory=list)     # SDK ReadableSpans
    profiles: Optional[object] = None             # ExportProfilesServiceRequest

    def is_empty(self) -> bool:
        return not any(self.metrics.values()) and not self.spans and self.profiles is None
