"""Prometheus pull: the latest cumulative state of every metric, for a scraper.

Names follow the OpenTelemetry Prometheus compatibility rules, through the
OpenTelemetry Prometheus exporter's own mapping (opentelemetry-exporter-
prometheus): dots to underscores, the unit as a suffix (`By` -> `_bytes`;
annotations such as `{request}` and the unit `1` add none), `_total` on
counters, `_bucket`/`_sum`/`_count` on histograms, resource attributes on
`target_info`, the scope as `otel_scope_name`/`otel_scope_version` labels.
Durations (ns, us, ms) are exposed in seconds, Prometheus's base unit.
Histograms are classic buckets: the record's explicit bounds where it has
them (http: the semantic conventions'), else its exact log2 edges, from the
edge below the series' lowest populated bucket to its highest (40 edges per
series would make a busy host's scrape tens of MB); an edge once shown stays,
so every `le` series is continuous.
prometheus_client encodes the text format or OpenMetrics, whichever the
scraper's Accept header asks for.
"""
from __future__ import annotations

import json
import logging
import threading

# The compatibility rules as the OpenTelemetry Prometheus exporter implements
# them (its public reader needs an SDK MeterProvider; the agent builds data
# from kernel records, so it uses the same mapping on its own records).
from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute, sanitize_full_name
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..records import Counter, Gauge, Log2Histogram
from .metrics_data import UNIT_TO_SECONDS, explicit_point

log = logging.getLogger("otelbpf.export.prometheus")

def prometheus_unit(unit: str) -> str:
    """The unit suffix a metric's Prometheus name ends with ('' for none)."""
    return map_unit("s" if unit in UNIT_TO_SECONDS else (unit or ""))


def prometheus_name(name: str, unit: str, kind: str) -> str:
    """The family name a scraper sees: kind is counter, gauge or histogram
    (whose series add _bucket, _sum and _count)."""
    base = sanitize_full_name(name)
    if kind == "counter" and base.endswith("_total"):
        base = base[:-len("_total")]
    suffix = prometheus_unit(unit)
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    return base + "_total" if kind == "counter" else base


def _series_key(scope: str, r) -> tuple:
    return (scope, r.instrument.name, tuple(sorted(r.attributes.items(), key=lambda kv: kv[0])))


def _edge_range(buckets: list, before) -> tuple:
    """Bucket indexes whose upper edges a log2 series shows: from the one
    below its lowest populated bucket (the lower bound histogram_quantile
    interpolates from) to its highest; the last kernel bucket is the
    overflow, +Inf. Widened to what it showed before."""
    filled = [i for i, c in enumerate(buckets) if c]
    if not filled:
        return before   # None: +Inf alone
    lo, hi = max(filled[0] - 1, 0), min(filled[-1], len(buckets) - 2)
    if before is not None:
        lo, hi = min(lo, before[0]), max(hi, before[1])
    return lo, hi


def _label_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _labels(scope: str, attributes: dict) -> dict:
    out = {"otel_scope_name": scope, "otel_scope_version": __version__}
    out.update((sanitize_attribute(k), _label_value(v)) for k, v in attributes.items())
    return out


def _family(cls, name: str, description: str, unit: str, keys: list):
    """A prometheus_client family; its name without the unit, which the
    family appends itself (and OpenMetrics declares in # UNIT)."""
    if unit and name.endswith("_" + unit):
        name = name[:-len(unit) - 1]
    return cls(name, description, labels=keys, unit=unit)


class MetricsSnapshot:
    """A prometheus_client Collector of the last batch's records. Probes
    report cumulative values, so the last batch is the whole state; a series
    the last batch no longer carries (an exited process after its final
    report, an idle flow) is gone from the next scrape, as it is from OTLP."""

    def __init__(self):
        self._lock = threading.Lock()
        self._resource = None
        self._scopes: dict = {}
        self._time_ns = 0
        self._edges: dict = {}   # log2 series -> (lowest, highest) bucket index shown so far

    def update(self, resource, scopes: dict, time_ns: int) -> None:
        edges = {}
        for scope, records in scopes.items():
            for r in records:
                if isinstance(r, Log2Histogram) and r.explicit_bounds is None:
                    key = _series_key(scope, r)
                    edges[key] = _edge_range(r.buckets, self._edges.get(key))
        with self._lock:
            self._resource, self._scopes, self._time_ns = resource, scopes, time_ns
            self._edges = edges   # series gone from the batch are forgotten with it

    def describe(self):
        return []  # families are known only once data arrives

    def collect(self):
        with self._lock:
            resource, scopes, now_ns, edges = self._resource, self._scopes, self._time_ns, self._edges
        if resource is not None and resource.attributes:
            yield InfoMetricFamily("target", "Target metadata",
                                   value={sanitize_attribute(k): _label_value(v)
                                          for k, v in resource.attributes.items()})
        grouped: dict = {}  # prometheus name -> (kind, instrument, [(scope, record)])
        for scope, records in scopes.items():
            for r in records:
                kind = ("histogram" if isinstance(r, Log2Histogram) else "counter" if isinstance(r, Counter)
                        else "gauge" if isinstance(r, Gauge) else None)
                if kind is None:
                    continue
                name = prometheus_name(r.instrument.name, r.instrument.unit, kind)
                entry = grouped.setdefault(name, (kind, r.instrument, []))
                if entry[0] != kind:
                    log.debug("%s: %s and %s records share a name; the %s is left out", name, entry[0], kind, kind)
                    continue
                entry[2].append((scope, r))
        for name, (kind, inst, members) in grouped.items():
            yield self._build(name, kind, inst, members, now_ns, edges)

    @staticmethod
    def _build(name: str, kind: str, inst, members: list, now_ns: int, edges: dict):
        rows = [(scope, _labels(scope, r.attributes), r) for scope, r in members]
        keys = sorted({k for _s, labels, _r in rows for k in labels})
        unit = prometheus_unit(inst.unit)
        factor = UNIT_TO_SECONDS.get(inst.unit, 1.0)
        if kind == "counter":
            fam = _family(CounterMetricFamily, name[:-len("_total")], inst.description, unit, keys)
        else:
            fam = _family(HistogramMetricFamily if kind == "histogram" else GaugeMetricFamily, name,
                          inst.description, unit, keys)
        for scope, labels, r in rows:
            values = [labels.get(k, "") for k in keys]   # a label a series lacks is empty, as Prometheus reads it
            if kind == "histogram":
                point = explicit_point(r, now_ns)         # bounds and sum in seconds for ns/us/ms
                cumulative, total = [], 0
                for count in point.bucket_counts:
                    total += count
                    cumulative.append(total)
                shown = range(len(point.explicit_bounds))
                if r.explicit_bounds is None:
                    lo_hi = edges.get(_series_key(scope, r))
                    shown = range(lo_hi[0], lo_hi[1] + 1) if lo_hi else range(0)
                buckets = [(floatToGoString(point.explicit_bounds[i]), cumulative[i]) for i in shown]
                fam.add_metric(values, buckets + [("+Inf", total)], point.sum)
            else:
                fam.add_metric(values, r.value * factor)
        # a label a series lacks is left out (backfilled "" above only to fit the family's label names)
        fam.samples = [s._replace(labels={k: v for k, v in s.labels.items() if v != ""}) for s in fam.samples]
        return fam


def encode(registry, accept: str) -> tuple:
    """(body, content type): OpenMetrics when the Accept header asks for it,
    else the Prometheus text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def parse_listen(listen: str) -> tuple:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


class PrometheusExporter:
    """Holds the latest batch's metrics; the scrape reads them. Served on
    the health server's /metrics, or on its own `listen` address."""
    name = "prometheus"
    signal_lanes = True   # it takes metrics only; spans and profiles are not for Prometheus

    def __init__(self, cfg: dict, health=None):
        self.snapshot = MetricsSnapshot()
        self.registry = CollectorRegistry()
        self.registry.register(self.snapshot)
        self._health = None
        self._server = None
        if cfg.get("listen"):
            from prometheus_client import start_http_server
            host, port = parse_listen(cfg["listen"])
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self.address = "%s:%d" % self._server.server_address[:2]
        else:
            if health is None:
                raise RuntimeError("no health server to serve /metrics on (health: is empty or its address was "
                                   "taken); set exporters.prometheus.listen")
            health.serve_metrics(self.registry)
            self._health = health
            self.address = health.address
        log.info("prometheus: every metric on http://%s/metrics", self.address)

    def export(self, batch) -> bool:
        if any(batch.metrics.values()):
            self.snapshot.update(batch.resource, batch.metrics, batch.time_ns)
        return True

    def shutdown(self) -> None:
        if self._health is not None:
            self._health.serve_metrics(None)   # back to the agent's own telemetry
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
