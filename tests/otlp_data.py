"""Reading exported OTLP requests back: find data points by metric name and
attributes, whatever transport carried them."""
from __future__ import annotations

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest


def attr_value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs_of(kvs) -> dict:
    return {kv.key: attr_value(kv.value) for kv in kvs}


def metrics(requests, name: str):
    """(resource attrs, scope name, Metric) for every metric called name."""
    for req in requests:
        for rm in req.resource_metrics:
            res = attrs_of(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        yield res, sm.scope.name, m


def points(requests, name: str, **match):
    """Data points of metric `name` whose attributes include `match`
    (keys with dots written as __, e.g. process__pid=1)."""
    want = {k.replace("__", "."): v for k, v in match.items()}
    out = []
    for _res, _scope, m in metrics(requests, name):
        kind = m.WhichOneof("data")
        for dp in getattr(m, kind).data_points:
            a = attrs_of(dp.attributes)
            if all(a.get(k) == v for k, v in want.items()):
                out.append((m, dp, a))
    return out


def last_point(requests, name: str, **match):
    pts = points(requests, name, **match)
    assert pts, f"no {name} point with {match}"
    return max(pts, key=lambda p: p[1].time_unix_nano)


def exp_buckets(dp) -> dict:
    """OTLP exponential bucket index -> count."""
    return {dp.positive.offset + i: c for i, c in enumerate(dp.positive.bucket_counts) if c}


def read_jsonl(path) -> list:
    out = []
    with open(path) as f:
        for line in f:
            req = ExportMetricsServiceRequest()
            json_format.Parse(line, req)
            out.append(req)
    return out
