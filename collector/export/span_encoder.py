"""OTLP span encoding: the ExportTraceServiceRequest that the SDK's
encode_spans() builds, at a quarter of its cost.

The SDK builds a KeyValue and an AnyValue message per attribute of every
span: 36-40 us a span here, half of the agent's CPU at the default 1,000
spans/s. A span's attributes mostly repeat (method, status, route, peer,
process), and so do its name, kind and status: each is serialized once by
the protobuf runtime and its bytes kept (bounded). A span's encoding is
then those bytes joined with its own ids and times (fixed-size fields:
their key, from the schema, and the bytes), and each scope's spans go into
their ScopeSpans with one MergeFromString (a repeated field's encodings
concatenate). The result equals encode_spans()' field for field
(tests/test_span_encoder.py). What this does not cover (events, links, a
trace state, non-scalar attribute values, an unended span) goes through the
SDK's encoder unchanged.
"""
from __future__ import annotations

import struct
from collections import defaultdict

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span as PbSpan, SpanFlags, Status
from opentelemetry.trace import SpanKind

_KINDS = {SpanKind.INTERNAL: PbSpan.SPAN_KIND_INTERNAL, SpanKind.SERVER: PbSpan.SPAN_KIND_SERVER,
          SpanKind.CLIENT: PbSpan.SPAN_KIND_CLIENT, SpanKind.PRODUCER: PbSpan.SPAN_KIND_PRODUCER,
          SpanKind.CONSUMER: PbSpan.SPAN_KIND_CONSUMER}
_FLAGS_LOCAL = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = _FLAGS_LOCAL | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_CACHE_MAX = 65536      # distinct (key, value) encodings kept; cleared when full


class _LeaveToSdk(Exception):
    """What this encoder does not cover: the SDK's encode_spans() encodes it."""


def _any_value(value) -> AnyValue:
    # the SDK's order of tests: bool before int (a bool is an int)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if value is None:
        return AnyValue()
    raise _LeaveToSdk


def _tag(message, field: str) -> bytes:
    """A field's key on the wire (its number and wire type), from the schema."""
    f = message.DESCRIPTOR.fields_by_name[field]
    wire = {f.TYPE_FIXED64: 1, f.TYPE_BYTES: 2, f.TYPE_MESSAGE: 2}[f.type]
    return _varint(f.number << 3 | wire)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# the fields every span has its own value of: fixed-size, so their encoding
# is the field's key and the bytes (ids big-endian as the SDK writes them,
# times as little-endian fixed64)
_TRACE_ID, _SPAN_ID, _PARENT_ID = _tag(PbSpan, "trace_id"), _tag(PbSpan, "span_id"), _tag(PbSpan, "parent_span_id")
_START, _END = _tag(PbSpan, "start_time_unix_nano"), _tag(PbSpan, "end_time_unix_nano")
_SPANS = _tag(ScopeSpans, "spans")
_U64 = struct.Struct("<Q")


class SpanEncoder:
    """encode(spans) -> ExportTraceServiceRequest, as the SDK's encode_spans.
    One per exporter: its caches are not shared between threads."""

    def __init__(self, cache_max: int = _CACHE_MAX):
        self._attrs: dict = {}      # (key, type, value) -> the bytes of Span{attributes: [kv]}
        self._common: dict = {}     # what spans share (name, kind, status, flags, counts) -> their bytes
        self._cache_max = cache_max
        self._resources: dict = {}  # id(resource) -> (resource, its PbResource)

    def _cached(self, cache: dict, key, build) -> bytes:
        b = cache.get(key)
        if b is None:
            b = build()
            if len(cache) >= self._cache_max:
                cache.clear()
            cache[key] = b
        return b

    def _attr_bytes(self, key: str, value) -> bytes:
        return self._cached(self._attrs, (key, value.__class__, value), lambda: PbSpan(
            attributes=[KeyValue(key=key, value=_any_value(value))]).SerializeToString())

    def _span_bytes(self, s) -> bytes:
        """Span s serialized: the fields it shares with others from the
        caches, its ids and times encoded here."""
        ctx = s.get_span_context()
        if s.start_time is None or s.end_time is None:
            raise _LeaveToSdk        # an unended span: the SDK leaves its times out
        parent = s.parent
        remote = parent is not None and parent.is_remote
        status = s.status
        common = (s.name, s.kind, status.status_code.value, status.description, remote, s.dropped_attributes,
                  s.dropped_events, s.dropped_links)
        parts = [_TRACE_ID, b"\x10", ctx.trace_id.to_bytes(16, "big"), _SPAN_ID, b"\x08",
                 ctx.span_id.to_bytes(8, "big")]
        if parent:
            parts += [_PARENT_ID, b"\x08", parent.span_id.to_bytes(8, "big")]
        parts += [_START, _U64.pack(s.start_time), _END, _U64.pack(s.end_time),
                  self._cached(self._common, common, lambda: PbSpan(
                      name=s.name, kind=_KINDS[s.kind],
                      status=Status(code=status.status_code.value, message=status.description),
                      dropped_attributes_count=s.dropped_attributes, dropped_events_count=s.dropped_events,
                      dropped_links_count=s.dropped_links,
                      flags=_FLAGS_REMOTE if remote else _FLAGS_LOCAL).SerializeToString())]
        attrs = s.attributes
        if attrs:
            cache = self._attrs
            for k, v in attrs.items():
                # the type is in the key: 1, 1.0 and True are equal in Python
                try:
                    b = cache.get((k, v.__class__, v))
                except TypeError:       # unhashable: a list, a dict
                    raise _LeaveToSdk from None
                parts.append(b if b is not None else self._attr_bytes(k, v))
        return b"".join(parts)

    def _resource(self, resource) -> PbResource:
        hit = self._resources.get(id(resource))
        if hit is None or hit[0] is not resource:
            if len(self._resources) >= 4096:
                self._resources.clear()
            pb = PbResource(attributes=[KeyValue(key=k, value=_any_value(v))
                                        for k, v in resource.attributes.items()])
            hit = self._resources[id(resource)] = (resource, pb)
        return hit[1]

    @staticmethod
    def _scope(scope) -> InstrumentationScope:
        if scope is None:
            return InstrumentationScope()
        return InstrumentationScope(name=scope.name, version=scope.version,
                                    attributes=[KeyValue(key=k, value=_any_value(v))
                                                for k, v in (scope.attributes or {}).items()])

    def encode(self, spans) -> ExportTraceServiceRequest:
        """The request encode_spans(spans) would build; a span or resource
        this cannot encode goes through encode_spans itself."""
        # as the SDK groups: by resource (equal ones together), then scope,
        # in span order. Resources are compared, once per distinct object,
        # never hashed: a Resource hashes by JSON-encoding its attributes.
        groups = []                 # (resource, {scope: [span bytes]}), in order of first appearance
        group_of: dict = {}         # id(resource) -> its group (equal resources share one)
        for s in spans:
            try:
                if s.events or s.links or s.get_span_context().trace_state:
                    raise _LeaveToSdk
                b = self._span_bytes(s)
            except _LeaveToSdk:
                b = sdk_encode_spans([s]).resource_spans[0].scope_spans[0].spans[0].SerializeToString()
            group = group_of.get(id(s.resource))
            if group is None:
                group = next((g for g in groups if g[0] == s.resource), None)
                if group is None:
                    group = (s.resource, defaultdict(list))
                    groups.append(group)
                group_of[id(s.resource)] = group
            group[1][s.instrumentation_scope or None].append(b)
        out = []
        for resource, scopes in groups:
            try:
                pb_resource = self._resource(resource)
                pb_scopes = {scope: self._scope(scope) for scope in scopes}
            except _LeaveToSdk:      # a resource or scope attribute this does not encode: the SDK's way
                out.extend(sdk_encode_spans([s for s in spans if s.resource == resource]).resource_spans)
                continue
            scope_spans = []
            for scope, encoded in scopes.items():
                ss = ScopeSpans(scope=pb_scopes[scope], schema_url=scope.schema_url if scope else None)
                ss.MergeFromString(b"".join(b for e in encoded for b in (_SPANS, _varint(len(e)), e)))
                scope_spans.append(ss)
            out.append(ResourceSpans(resource=pb_resource, scope_spans=scope_spans, schema_url=resource.schema_url))
        return ExportTraceServiceRequest(resource_spans=out)


ENCODER = SpanEncoder()
"""The agent's one encoder: exporters on different threads share it (its
caches only ever gain entries or are cleared, which the GIL keeps whole)."""
