"""Kernel log2 buckets -> OTLP exponential (scale 0) and explicit histograms."""
from __future__ import annotations

import math

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.resources import Resource

from collector.export import metrics_data
from collector.export.console import quantile_upper_bound
from collector.records import Instrument, Log2Histogram

NS = Instrument("t.duration", "ns", "test")


def kernel_bucket(v: int) -> int:
    """Python twin of otb_log2_bucket() in bpf/log2_hist.h (40 buckets)."""
    b = 0 if v <= 1 else (v - 1).bit_length()
    return min(b, 39)


def otlp_scale0_index(v: float) -> int:
    """OTLP spec: at scale 0, index i covers (2^i, 2^(i+1)]."""
    return math.ceil(math.log2(v)) - 1


def test_kernel_bucket_is_otlp_index_plus_one():
    for v in [2, 3, 4, 5, 7, 8, 9, 1000, 1024, 1025, 20_000_000, 2 ** 30, 2 ** 30 + 1]:
        assert kernel_bucket(v) - 1 == otlp_scale0_index(v), v


def test_exponential_point_offsets_and_trims():
    buckets = [0] * 40
    buckets[3], buckets[5] = 7, 2          # values in (4, 8] and (16, 32]
    h = Log2Histogram(NS, {"a": 1}, buckets, 100.0, 123)
    p = metrics_data.exponential_point(h, 456)
    assert p.scale == 0 and p.count == 9 and p.zero_count == 0
    assert p.positive.offset == 2 and list(p.positive.bucket_counts) == [7, 0, 2]
    assert p.start_time_unix_nano == 123 and p.time_unix_nano == 456


def test_empty_histogram():
    p = metrics_data.exponential_point(Log2Histogram(NS, {}, [0] * 40, 0.0, 1), 2)
    assert p.count == 0 and list(p.positive.bucket_counts) == []


def test_explicit_form_in_seconds_keeps_the_bucket_edges():
    buckets = [0] * 40
    buckets[25] = 4
    p = metrics_data.explicit_point(Log2Histogram(NS, {}, buckets, 8e7, 1), 2)
    assert len(p.explicit_bounds) == 39 and len(p.bucket_counts) == 40
    assert p.explicit_bounds[24] == 2 ** 24 * 1e-9 and p.explicit_bounds[25] == 2 ** 25 * 1e-9
    assert p.bucket_counts[25] == 4 and p.sum == 8e7 * 1e-9


def test_metrics_data_encodes_to_otlp():
    buckets = [0] * 40
    buckets[10] = 5
    scopes = {"otelbpf.probe.x": [Log2Histogram(NS, {"syscall.name": "read"}, buckets, 5000.0, 10)]}
    for form, field in (("exponential", "exponential_histogram"), ("explicit", "histogram")):
        req = encode_metrics(metrics_data.build(Resource({"service.name": "t"}), scopes, 20, form))
        m = req.resource_metrics[0].scope_metrics[0].metrics[0]
        assert m.WhichOneof("data") == field
        assert m.unit == ("ns" if form == "exponential" else "s")
        assert getattr(m, field).aggregation_temporality == 2


def test_quantile_upper_bound():
    buckets = [0] * 40
    buckets[4], buckets[10] = 98, 2
    assert quantile_upper_bound(buckets, 0.5) == 16
    assert quantile_upper_bound(buckets, 0.99) == 1024



def http_units(dur_ns: int) -> int:
    """Python twin of l7_count_duration()'s conversion in bpf/l7/duration.h:
    ceil(dur_ns * 2^30 / 10^9), split at whole seconds (below one, in one
    division), after the clamp."""
    dur_ns = min(dur_ns, 1 << 43)
    if dur_ns < 1_000_000_000:
        return ((dur_ns << 30) + 999_999_999) // 1_000_000_000
    q, r = divmod(dur_ns, 1_000_000_000)
    units = (q << 30) + ((r << 30) + 999_999_999) // 1_000_000_000
    assert units < 1 << 64 and (r << 30) + 999_999_999 < 1 << 64   # no u64 overflow in the kernel
    return units


def test_http_duration_units_put_edge_values_in_the_right_bucket():
    """Bucket of a duration in 2^-30 s units = the OTLP scale-0 bucket
    (offset -30) of its exact value in seconds, also one ns either side of
    every power-of-two edge: the conversion rounds up, so a duration just
    above an edge is never pulled into the bucket below."""
    from fractions import Fraction

    from probes.http import log2_bucket
    durations = [0, 1, 2, 931, 932, 999_999_999, 1_000_000_000, 1_000_000_001]
    for k in range(-30, 14):
        edge = Fraction(2) ** k * 10 ** 9          # 2^k s in ns (not a whole number below k = 9)
        lo = int(edge)
        durations += [lo - 1, lo, lo + 1, lo + 2]
    for d in durations:
        if d <= 0:
            continue
        exact = Fraction(d, 10 ** 9)               # seconds
        want = min(max(math.ceil(math.log2(exact * 2 ** 30)) if exact * 2 ** 30 > 1 else 0, 0), 39)
        # log2 of a Fraction rounds: settle the edge cases exactly
        while want > 0 and exact * 2 ** 30 <= 2 ** (want - 1):
            want -= 1
        while want < 39 and exact * 2 ** 30 > 2 ** want:
            want += 1
        assert kernel_bucket(http_units(d)) == want, (d, http_units(d), want)
        # HTTP/2's durations are bucketed in user space: the same bucket
        assert log2_bucket(d) == want, (d, log2_bucket(d), want)
        if want < 39:
            # and the exported range (offset -30) holds the true value
            lo_s, hi_s = Fraction(2) ** (want - 31), Fraction(2) ** (want - 30)
            assert (want == 0 or lo_s < exact) and exact <= hi_s, d


def test_kernel_semconv_bounds_are_the_exported_ones_in_ns():
    """sem_bucket() in bpf/l7/duration.h counts against ns literals; the
    explicit form exports SEM_BOUNDS in s. The known-duration tests reach
    bounds up to 2.5 s only, so compare the two lists themselves: a bound
    written in the wrong unit (5000000000000 for 5 s) fails here."""
    import re
    from pathlib import Path
    from probes.http import NS_PER_S, SEM_BOUNDS
    src = (Path(__file__).resolve().parent.parent / "bpf" / "l7" / "duration.h").read_text()
    body = src[src.index("static __always_inline __u32 sem_bucket"):]
    body = body[:body.index("}")]
    kernel = [int(x) for x in re.findall(r"GT\(d, (\d+)ULL\)", body)]
    assert kernel == [round(b * NS_PER_S) for b in SEM_BOUNDS]


def test_user_space_series_bucket_like_the_kernel():
    """HTTP/2 durations go into the same series as HTTP/1's kernel counts
    (_Series.add): log2 bucket as count_request(), explicit bucket as
    sem_bucket() (a duration equal to a bound stays at or below it), sum in
    ns."""
    from probes.http import NS_PER_S, SEM_BOUNDS, _Series
    s = _Series(0, None)
    for b in SEM_BOUNDS:
        ns = round(b * NS_PER_S)
        s.add(ns)          # at the bound: bucket (previous, b]
        s.add(ns + 1)      # above: the next bucket
    assert s.sem[0] == 1 and s.sem[-1] == 1 and all(n == 2 for n in s.sem[1:-1]), s.sem
    assert sum(s.log2) == 2 * len(SEM_BOUNDS)
    assert s.sum_ns == sum(2 * round(b * NS_PER_S) + 1 for b in SEM_BOUNDS)
    one = _Series(0, None)
    one.add(100_000_000)   # 0.1 s: (2^-4, 2^-3] s, kernel bucket 27 (offset -30)
    assert one.log2.index(1) == kernel_bucket(http_units(100_000_000)) == 27
