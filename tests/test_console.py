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


def _request(method, route, count, link):
    return ProfileSample({"process.pid": 1, "http.request.method": method, "http.route": route},
                         [Frame("handler", 4), Frame("main", 2)], count, link)


def test_profile_breaks_cpu_down_by_route_when_samples_were_in_requests():
    samples = [_request("POST", "/checkout", 5, (1, 1)), _request("POST", "/checkout", 3, (2, 2)),
               _request("GET", "/cart", 4, (3, 3)), _request("GET", "/health", 1, (4, 4)),
               ProfileSample({"process.pid": 1}, [Frame("idle", 5)], 7)]
    c = ConsoleExporter({"top": 2, "clear": False}, out=io.StringIO())
    text = c.render(Batch(time_ns=1, profiles={"p": [Profile(samples, 0, 1, 1)]}))
    lines = text.splitlines()
    start = lines.index("  by route:")
    # of 20 samples: /checkout 8 (two requests), /cart 4; /health (1) is past top=2; 7 outside any request
    assert [line.split() for line in lines[start + 1:start + 6]] == [
        ["cpu%", "samples", "route"], ["40.0", "8", "POST", "/checkout"], ["20.0", "4", "GET", "/cart"],
        ["...", "1", "more", "routes"], ["35.0", "7", "(no", "request)"]]
    assert "cpu profile: 20 samples" in text

    no_requests = c.render(_batch(2, 1, 0))
    assert "cpu profile: 4 samples" in no_requests and "by route" not in no_requests
