"""Reading exported OTLP requests back: find data points by metric name and
attributes, whatever transport carried them."""
from __future__ import annotations

import math

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


def latest_per_series(pts) -> list:
    """Of points() output, the last cumulative point of each attribute set:
    summed, they are a total across series (per pid, per executable...)."""
    latest: dict = {}
    for m, dp, a in pts:
        key = tuple(sorted(a.items()))
        if key not in latest or dp.time_unix_nano > latest[key][1].time_unix_nano:
            latest[key] = (m, dp, a)
    return list(latest.values())


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


def _each_sample(requests):
    """(dictionary, sample, its attributes, its locations leaf first) of every profile sample."""
    for req in requests:
        d = req.dictionary
        strs = d.string_table
        for rp in req.resource_profiles:
            for sp in rp.scope_profiles:
                for p in sp.profiles:
                    for s in p.samples:
                        attrs = {strs[d.attribute_table[i].key_strindex]: attr_value(d.attribute_table[i].value)
                                 for i in s.attribute_indices}
                        locs = [d.location_table[li] for li in d.stack_table[s.stack_index].location_indices]
                        yield d, s, attrs, locs


def _function(d, loc):
    return d.string_table[d.function_table[loc.lines[0].function_index].name_strindex] if loc.lines else None


def profile_samples(requests):
    """(attributes, [function names leaf first], [is kernel], count) per sample."""
    out = []
    kernel_maps = {}
    for d, s, attrs, locs in _each_sample(requests):
        if id(d) not in kernel_maps:
            kernel_maps[id(d)] = {i for i, m in enumerate(d.mapping_table)
                                  if d.string_table[m.filename_strindex] == "[kernel.kallsyms]"}
        out.append((attrs, [_function(d, loc) for loc in locs],
                    [loc.mapping_index in kernel_maps[id(d)] for loc in locs], s.values[0]))
    return out


def linked_samples(requests, pid: int) -> list:
    """(attributes, (trace id hex, span id hex) or None, [function names leaf
    first, "" where unnamed], count) of every sample of process pid."""
    out = []
    for d, s, attrs, locs in _each_sample(requests):
        if attrs.get("process.pid") != pid:
            continue
        link = None
        if s.link_index:
            lk = d.link_table[s.link_index]
            link = (lk.trace_id.hex(), lk.span_id.hex())
        out.append((attrs, link, [_function(d, loc) or "" for loc in locs], s.values[0]))
    return out


def server_spans(requests, port: int) -> dict:
    """span id hex -> (trace id hex, attributes) of the SERVER spans of port."""
    out = {}
    for req in requests:
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    a = attrs_of(s.attributes)
                    if s.kind == 2 and a.get("server.port") == port:   # SPAN_KIND_SERVER
                        out[s.span_id.hex()] = (s.trace_id.hex(), a)
    return out


# ------------------------------------------------------------ histograms

# seconds -> the unit a histogram metric is exported in
UNIT_PER_SECOND = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}


def _hist_kind(m):
    kind = m.WhichOneof("data")
    return kind if kind in ("histogram", "exponential_histogram") else None


def populated_ranges(m, dp) -> list:
    """(lower, upper, count) of every populated bucket of a histogram point,
    in the metric's unit: a bucket holds values v with lower < v <= upper
    (OTLP: explicit bucket i is (bounds[i-1], bounds[i]]; exponential index
    i at scale s is (2^(i/2^s), 2^((i+1)/2^s)]). The zero bucket is (-inf, 0]
    here (the agent never exports negative values)."""
    out = []
    if _hist_kind(m) == "exponential_histogram":
        base = 2.0 ** (2.0 ** -dp.scale)
        if dp.zero_count:
            out.append((float("-inf"), 0.0, dp.zero_count))
        for i, c in enumerate(dp.positive.bucket_counts):
            if c:
                k = dp.positive.offset + i
                out.append((base ** k, base ** (k + 1), c))
        for i, c in enumerate(dp.negative.bucket_counts):
            if c:
                k = dp.negative.offset + i
                out.append((-base ** (k + 1), -base ** k, c))
    else:
        bounds = list(dp.explicit_bounds)
        for i, c in enumerate(dp.bucket_counts):
            if c:
                lo = bounds[i - 1] if i > 0 else float("-inf")
                hi = bounds[i] if i < len(bounds) else float("inf")
                out.append((lo, hi, c))
    return out


def check_histogram_point(m, dp) -> None:
    """One exported histogram point is self-consistent: its count is the sum
    of its buckets, its mean lies inside the populated buckets' range, and
    its time is not before its start."""
    kind = _hist_kind(m)
    where = f"{m.name} {attrs_of(dp.attributes)}"
    if kind == "exponential_histogram":
        n = sum(dp.positive.bucket_counts) + sum(dp.negative.bucket_counts) + dp.zero_count
    else:
        n = sum(dp.bucket_counts)
        assert len(dp.bucket_counts) == len(dp.explicit_bounds) + 1, where
        assert list(dp.explicit_bounds) == sorted(set(dp.explicit_bounds)), f"{where}: bounds not increasing"
    assert dp.count == n, f"{where}: count {dp.count} but buckets hold {n}"
    assert dp.start_time_unix_nano and dp.time_unix_nano >= dp.start_time_unix_nano, where
    if dp.count:
        ranges = populated_ranges(m, dp)
        lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
        mean = dp.sum / dp.count
        # the bounds are floats (2^k ns in s): allow their rounding, nothing more
        eps = 1e-9 * max(abs(lo) if lo != float("-inf") else 0, abs(hi) if hi != float("inf") else 0)
        assert lo - eps <= mean <= hi + eps, f"{where}: sum/count {mean} outside the populated buckets " \
                                             f"({lo}, {hi}]: {ranges}"
    else:
        assert dp.sum == 0, f"{where}: empty but sum {dp.sum}"


def _series_buckets(m, dp) -> dict:
    if _hist_kind(m) == "exponential_histogram":
        # keyed by the bucket's range, so points with other offsets compare
        return {(lo, hi): c for lo, hi, c in populated_ranges(m, dp)}
    return {i: c for i, c in enumerate(dp.bucket_counts)}


def check_histograms(requests) -> int:
    """Every histogram point of every request passes check_histogram_point,
    and each series (metric, attributes, resource) is cumulative: one start
    time for all its points, and no count, sum or bucket ever decreases from
    one export to the next. Returns how many points were checked (a caller
    can insist there were some)."""
    series: dict = {}
    n = 0
    for req in requests:
        for rm in req.resource_metrics:
            res = tuple(sorted(attrs_of(rm.resource.attributes).items()))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = _hist_kind(m)
                    if kind is None:
                        continue
                    data = getattr(m, kind)
                    assert data.aggregation_temporality == 2, f"{m.name}: not cumulative"
                    for dp in data.data_points:
                        check_histogram_point(m, dp)
                        n += 1
                        key = (m.name, kind, m.unit, res, sm.scope.name,
                               tuple(sorted((k, str(v)) for k, v in attrs_of(dp.attributes).items())))
                        series.setdefault(key, []).append((m, dp))
    for key, pts in series.items():
        pts.sort(key=lambda p: p[1].time_unix_nano)
        starts = {dp.start_time_unix_nano for _m, dp in pts}
        assert len(starts) == 1, f"{key[0]} {key[-1]}: start time moved: {sorted(starts)}"
        if key[1] == "histogram":
            assert len({tuple(dp.explicit_bounds) for _m, dp in pts}) == 1, f"{key[0]} {key[-1]}: bounds moved"
        for (m0, a), (m1, b) in zip(pts, pts[1:]):
            where = f"{key[0]} {key[-1]} at {b.time_unix_nano}"
            assert b.count >= a.count and b.sum >= a.sum, \
                f"{where}: count {a.count} -> {b.count}, sum {a.sum} -> {b.sum}"
            before, after = _series_buckets(m0, a), _series_buckets(m1, b)
            for k, c in before.items():
                assert after.get(k, 0) >= c, f"{where}: bucket {k} went from {c} to {after.get(k, 0)}"
    return n


def exp_index_range(lo: float, hi: float) -> range:
    """Scale-0 exponential indices whose buckets (2^i, 2^(i+1)] can hold a
    value known to lie in [lo, hi] (lo > 0)."""
    first = math.ceil(math.log2(lo)) - 1
    last = math.ceil(math.log2(hi)) - 1
    return range(first, last + 1)


def assert_values_in_buckets(m, dp, lo_s: float, hi_s: float, n: int) -> None:
    """The point holds exactly n observations, each known to lie in
    [lo_s, hi_s] seconds (ground truth measured outside the agent), and
    every one sits in a bucket whose range meets [lo_s, hi_s]: when the
    interval lies inside one bucket, that bucket exactly. The sum agrees."""
    f = UNIT_PER_SECOND[m.unit]
    lo, hi = lo_s * f, hi_s * f
    where = f"{m.name} ({m.unit}, {_hist_kind(m)}) {attrs_of(dp.attributes)}"
    assert dp.count == n, f"{where}: count {dp.count}, expected {n}"
    ranges = populated_ranges(m, dp)
    for b_lo, b_hi, c in ranges:
        assert b_lo < hi and b_hi >= lo, \
            f"{where}: {c} observation(s) in ({b_lo:g}, {b_hi:g}] {m.unit}, true values in [{lo:g}, {hi:g}] " \
            f"{m.unit}; all populated buckets: {ranges}"
    assert n * lo * (1 - 1e-9) <= dp.sum <= n * hi * (1 + 1e-9), f"{where}: sum {dp.sum} for {n} x [{lo}, {hi}]"


def console_rows(text: str, instrument: str) -> list:
    """(total, p50 text, p99 text, label) of every row the console view
    printed under `instrument`, over all its renders."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith(f"{instrument}  ["):
            inside = True
            continue
        if not line.strip() or not line.startswith("  "):
            inside = False
            continue
        if inside and not line.lstrip().startswith(("/s", "new", "...")):
            parts = line.split(None, 4)
            if len(parts) == 5:
                rows.append((int(parts[1]), parts[2], parts[3], parts[4]))
    return rows


def parse_console_duration(text: str) -> tuple:
    """'244us', '16ms', '1.00s', '977ns' -> (seconds, half a unit of the last
    printed digit: how far the printed figure may be from the true one)."""
    for suffix, f, digit in (("ns", 1e-9, 1.0), ("us", 1e-6, 1.0), ("ms", 1e-3, 1.0), ("s", 1.0, 0.01)):
        if text.endswith(suffix):
            # (1 + 1e-9): 0.0625 - 0.062 is 0.0005000000000000004 in floats
            return float(text[:-len(suffix)]) * f, digit * f / 2 * (1 + 1e-9)
    raise ValueError(f"not a console duration: {text!r}")
