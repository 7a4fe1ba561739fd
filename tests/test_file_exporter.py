"""The file exporter writes one OTLP/JSON request per line for each signal,
and opentelemetry-proto's json_format reads every line back."""
from __future__ import annotations

import json

from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from collector.export.file import FileExporter
from collector.records import Batch, Counter, Frame, Instrument, Log2Histogram, Profile, ProfileSample

NS = Instrument("t.duration", "ns", "d")
CNT = Instrument("t.count", "{x}", "c")


def _spans():
    mem = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource({"service.name": "t"}))
    tp.add_span_processor(SimpleSpanProcessor(mem))
    tracer = tp.get_tracer("t")
    span = tracer.start_span("GET /", start_time=1_000)
    span.set_attribute("http.request.method", "GET")
    span.end(end_time=2_000)
    return mem.get_finished_spans()


def test_every_signal_is_one_parseable_line(tmp_path):
    path = tmp_path / "sub" / "t.jsonl"  # missing directories are created
    exp = FileExporter({"path": str(path), "histogram": "exponential"})
    buckets = [0] * 40
    buckets[7] = 3
    profile = Profile([ProfileSample({"process.pid": 7}, [Frame("leaf", 0x10), Frame("root", 0x20)], 3)],
                      start_time_ns=1, duration_ns=5, period_ns=10_101_010)
    batch = Batch(time_ns=10, resource=Resource({"service.name": "otelbpf"}),
                  metrics={"s": [Log2Histogram(NS, {"a": "b"}, buckets, 300.0, 1), Counter(CNT, {}, 4, 1)]},
                  spans=_spans(), profiles={"p": [profile]})
    assert exp.export(batch)
    exp.shutdown()

    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        json.loads(line)  # each line is one JSON document
    m = json_format.Parse(lines[0], ExportMetricsServiceRequest())
    t = json_format.Parse(lines[1], ExportTraceServiceRequest())
    p = json_format.Parse(lines[2], ExportProfilesServiceRequest())
    metric = m.resource_metrics[0].scope_metrics[0].metrics[0]
    assert metric.name == "t.duration" and metric.exponential_histogram.data_points[0].count == 3
    span = t.resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "GET /" and span.start_time_unix_nano == 1_000 and span.end_time_unix_nano == 2_000
    prof = p.resource_profiles[0].scope_profiles[0].profiles[0]
    assert prof.duration_nano == 5 and prof.period == 10_101_010 and prof.samples[0].values == [3]
    assert "resourceMetrics" in lines[0]  # protobuf's JSON mapping: lowerCamelCase names
