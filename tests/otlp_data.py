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


def check_profile_indices(req) -> None:
    """Every index in an ExportProfilesServiceRequest resolves in its dictionary."""
    d = req.dictionary
    n = {"s": len(d.string_table), "m": len(d.mapping_table), "l": len(d.location_table),
         "f": len(d.function_table), "a": len(d.attribute_table), "k": len(d.stack_table)}
    assert d.string_table[0] == ""
    for a in d.attribute_table:
        assert a.key_strindex < n["s"]
    for m in d.mapping_table:
        assert m.filename_strindex < n["s"] and all(i < n["a"] for i in m.attribute_indices)
    for f in d.function_table:
        assert f.name_strindex < n["s"] and f.filename_strindex < n["s"]
    for loc in d.location_table:
        assert loc.mapping_index < n["m"]
        assert all(line.function_index < n["f"] for line in loc.lines)
    for st in d.stack_table:
        assert all(i < n["l"] for i in st.location_indices)
    for rp in req.resource_profiles:
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                assert p.sample_type.type_strindex < n["s"] and p.period_type.unit_strindex < n["s"]
                for s in p.samples:
                    assert 0 < s.stack_index < n["k"]
                    assert all(i < n["a"] for i in s.attribute_indices)


def profile_samples(requests):
    """(attributes, [function names leaf first], [is kernel], count) per sample."""
    out = []
    for req in requests:
        d = req.dictionary
        strs = d.string_table
        kernel_maps = {i for i, m in enumerate(d.mapping_table) if strs[m.filename_strindex] == "[kernel.kallsyms]"}
        for rp in req.resource_profiles:
            for sp in rp.scope_profiles:
                for p in sp.profiles:
                    for s in p.samples:
                        attrs = {strs[d.attribute_table[i].key_strindex]: attr_value(d.attribute_table[i].value)
                                 for i in s.attribute_indices}
                        names, kernel = [], []
                        for li in d.stack_table[s.stack_index].location_indices:
                            loc = d.location_table[li]
                            fn = strs[d.function_table[loc.lines[0].function_index].name_strindex] if loc.lines else None
                            names.append(fn)
                            kernel.append(loc.mapping_index in kernel_maps)
                        out.append((attrs, names, kernel, s.values[0]))
    return out
