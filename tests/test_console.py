"""The live console view renders whatever records arrive: rates between
renders, percentiles from log2 buckets, hottest functions of a profile."""
from __future__ import annotations

import io

from collector.export.console import ConsoleExporter
from collector.records import Batch, Counter, Frame, Instrument, Log2Histogram, Profile, ProfileSample

LAT = Instrument("t.latency", "ns", "")
ERR = Instrument("t.errors", "1", "")


def _batch(t, count, errors):
    buckets = [0] * 40
    buckets[10] = count  # (512, 1024] ns
    prof = Profile([ProfileSample({"process.pid": 1}, [Frame("hot", 1), Frame("main", 2)], 3),
                    ProfileSample({"process.pid": 1}, [Frame("cold", 3), Frame("main", 2)], 1)], 0, 1, 1)
    return Batch(time_ns=t, metrics={"p": [Log2Histogram(LAT, {"syscall.name": "read"}, buckets, 0.0, 0),
                                           Counter(ERR, {"syscall.name": "read"}, errors, 0)]},
                 profiles={"p": [prof]})


def test_render_rates_percentiles_and_profile():
    out = io.StringIO()
    c = ConsoleExporter({"top": 5, "clear": False}, out=out)
    c.export(_batch(1_000_000_000, 100, 1))
    c.export(_batch(3_000_000_000, 300, 5))
    text = out.getvalue().split("otelbpf  ")[-1]  # the second render
    assert "(last 2.0s)" in text
    assert "100.0" in text and "1us" in text            # (300-100)/2s, p50/p99 <= 1024 ns
    assert "+4" in text and "total 5" in text           # counter delta and total
    assert "cpu profile: 4 samples" in text
    hot = next(line for line in text.splitlines() if line.rstrip().endswith("hot"))
    assert "75.0" in hot
