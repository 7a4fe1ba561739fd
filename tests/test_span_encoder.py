"""collector/export/span_encoder.py builds the very request the SDK's
encode_spans() builds, for the spans the agent makes and for the ones it
hands back to the SDK (events, links, trace state, list values)."""
from __future__ import annotations

import random

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from collector.export.span_encoder import SpanEncoder
from collector.export.spans import SpanConverter
from collector.records import Span

SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def agent_spans(n: int) -> list:
    """Spans as the http probe makes them, through the agent's converter:
    repeating and unique attribute values, parents, errors, two processes."""
    rnd = random.Random(7)
    out = []
    for i in range(n):
        attrs = {"http.request.method": "GET" if i % 3 else "POST", "http.response.status_code": 200 + (i % 4) * 100,
                 "network.peer.address": "127.0.0.1", "network.peer.port": 40000 + i,
                 "process.pid": 100 + i % 2, "process.executable.name": "nginx" if i % 2 else "python3",
                 "http.route": f"/r{i % 5}", "otelbpf.url.truncated": bool(i % 2), "ratio": i / 7,
                 "otelbpf.cpu.samples": i, "pyroscope.profile.id": f"{i:016x}", "same-number": 1,
                 "same-number-float": 1.0, "same-number-bool": True}
        parent = rnd.getrandbits(64) if i % 2 else None
        out.append(Span(f"GET /r{i % 5}", ("server", "client", "internal")[i % 3], rnd.getrandbits(128),
                        rnd.getrandbits(64) or 1, parent, 1_700_000_000_000_000_000 + i,
                        1_700_000_000_000_000_000 + i * 1_000_003, attrs, i % 4 == 0))
    return SpanConverter().convert(out, Resource({"service.name": "otelbpf", "host.name": "h"}))


def sdk_span(name: str, resource: Resource, **kw) -> ReadableSpan:
    ctx = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=SAMPLED, trace_state=kw.pop("trace_state", None))
    return ReadableSpan(name=name, context=ctx, resource=resource, kind=SpanKind.SERVER, start_time=1, end_time=2,
                        status=Status(StatusCode.ERROR, "boom"), **kw)


def test_agent_spans_encode_as_the_sdk_does():
    spans = agent_spans(300)
    enc = SpanEncoder()
    want = encode_spans(spans)
    assert enc.encode(spans) == want
    # again, from the caches, byte for byte
    assert enc.encode(spans).SerializeToString() == want.SerializeToString()
    assert len(want.resource_spans) == 2 and sum(len(ss.spans) for rs in want.resource_spans
                                                 for ss in rs.scope_spans) == 300


def test_a_full_cache_starts_again_and_still_encodes_the_same():
    spans = agent_spans(50)
    enc = SpanEncoder(cache_max=8)
    assert enc.encode(spans) == encode_spans(spans)


def test_equal_resources_of_distinct_objects_group_as_in_the_sdk():
    a, b = Resource({"service.name": "x"}), Resource({"service.name": "x"})
    scope = InstrumentationScope("otelbpf", "1", "https://schema", {"k": "v"})
    spans = [sdk_span("one", a, instrumentation_scope=scope), sdk_span("two", b), sdk_span("three", a)]
    got = SpanEncoder().encode(spans)
    assert got == encode_spans(spans)
    assert len(got.resource_spans) == 1 and len(got.resource_spans[0].scope_spans) == 2


def test_what_it_does_not_encode_goes_through_the_sdk_unchanged():
    r = Resource({"service.name": "x", "list": ["a", "b"]})    # a non-scalar resource attribute
    plain = Resource({"service.name": "y"})
    link = Link(SpanContext(1, 2, is_remote=True), {"l": 1})
    spans = [sdk_span("events", plain, events=[Event("e", {"a": 1}, timestamp=5)]),
             sdk_span("links", plain, links=[link]),
             sdk_span("state", plain, trace_state=TraceState([("k", "v")])),
             sdk_span("list", plain, attributes={"tags": ["a", "b"], "n": 3}),
             sdk_span("list-resource", r, attributes={"n": 3}),
             ReadableSpan(name="unended", context=SpanContext(1, 2, is_remote=False), resource=plain,
                          start_time=5),
             sdk_span("plain", plain, attributes={"n": 3})]
    assert SpanEncoder().encode(spans) == encode_spans(spans)


def test_both_otlp_exporters_encode_with_it():
    """The SDK's exporters send what span_encoder builds (a real receiver
    checks the content in test_otlp_exporter.py): gRPC through its
    _translate_data, HTTP through its module's encode_spans."""
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces

    from collector.export.otlp import make_span_exporter
    from collector.export.span_encoder import ENCODER
    spans = agent_spans(20)
    grpc_exporter = make_span_exporter({"protocol": "grpc", "endpoint": "127.0.0.1:1", "insecure": True,
                                        "timeout": 1})
    try:
        assert grpc_exporter._translate_data(spans) == encode_spans(spans)
    finally:
        grpc_exporter.shutdown()
    http_exporter = make_span_exporter({"protocol": "http/protobuf", "endpoint": "http://127.0.0.1:1",
                                        "timeout": 1})
    try:
        assert http_traces.encode_spans == ENCODER.encode
        assert http_traces.encode_spans(spans) == encode_spans(spans)
    finally:
        http_exporter.shutdown()


def test_a_second_http_exporter_finds_the_encoder_in_place_and_says_nothing(caplog):
    from collector.export.otlp import make_span_exporter
    for _ in range(2):
        make_span_exporter({"protocol": "http/protobuf", "endpoint": "http://127.0.0.1:1", "timeout": 1}).shutdown()
    assert not [r for r in caplog.records if "encodes differently" in r.getMessage()]
