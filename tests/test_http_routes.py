"""The user-space halves of the http probe that need no kernel: route
templates, traceparent parsing, and Span records -> SDK spans."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind
from opentelemetry.trace.status import StatusCode

from collector.config import ConfigError
from collector.export.spans import SpanConverter
from collector.records import Span
from probes.http import parse_traceparent
from probes.http_routes import OVERFLOW_ROUTE, RouteTable, check_patterns, looks_like_id


@pytest.mark.parametrize("seg,is_id", [("123", True), ("550e8400-e29b-41d4-a716-446655440000", True),
                                       ("deadbeef42", True), ("a1b2c3d4e5f6a7b8c9d0", True),
                                       ("users", False), ("release-notes-2024", False), ("v2", False),
                                       ("", False), ("abcdefgh", False)])
def test_id_like_segments(seg, is_id):
    assert looks_like_id(seg) is is_id


def test_patterns_win_in_order_then_templates_are_learned():
    t = RouteTable(["/users/{id}/orders", "/static/**", "/api/:v/items"], max_routes=10)
    assert t.route("/users/42/orders") == "/users/{id}/orders"
    assert t.route("/users/42/orders/7") == "/users/*/orders/*"          # pattern is exact length
    assert t.route("/static/css/site.css") == "/static/**"
    assert t.route("/api/v2/items") == "/api/:v/items"
    assert t.route("/accounts/9f86d081884c7d65/settings") == "/accounts/*/settings"
    assert t.route("/") == "/"
    assert t.route(None) == OVERFLOW_ROUTE


def test_learned_routes_are_bounded_and_overflow_is_counted():
    t = RouteTable([], max_routes=3)
    routes = {t.route(f"/page{chr(97 + i)}") for i in range(10)}   # 10 distinct non-id paths
    assert len(routes - {OVERFLOW_ROUTE}) == 3 and OVERFLOW_ROUTE in routes
    assert t.overflowed == 7
    assert t.route("/pagea") == "/pagea"      # known routes keep resolving


def test_learning_off_sends_unmatched_paths_to_the_overflow_route():
    t = RouteTable(["/health"], max_routes=10, learn=False)
    assert t.route("/health") == "/health" and t.route("/anything") == OVERFLOW_ROUTE


def test_bad_pattern_names_the_entry():
    with pytest.raises(ConfigError) as e:
        check_patterns(["/ok", "/a/**/b"], "probes.http.routes")
    assert "probes.http.routes[1]" in str(e.value)
    with pytest.raises(ConfigError):
        check_patterns(["no-slash"], "probes.http.routes")


@pytest.mark.parametrize("text,want", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
     (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7)),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),   # all-zero trace id is invalid
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),   # version ff is forbidden
    ("00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01", None),
    ("garbage", None), ("", None)])
def test_traceparent(text, want):
    assert parse_traceparent(text) == want


def test_span_records_become_sdk_spans_with_a_per_workload_resource():
    conv = SpanConverter()
    base = Resource({"host.name": "h", "service.name": "otelbpf"})
    recs = [Span("GET /users/*", "server", 0xABC, 0x1, 0x2, 10, 20,
                 {"http.request.method": "GET", "http.response.status_code": 503, "process.pid": 7,
                  "process.executable.name": "nginx", "k8s.deployment.name": "web"}, error=True),
            Span("GET", "client", 0xDEF, 0x3, None, 30, 45,
                 {"http.request.method": "GET", "process.pid": 8, "process.executable.name": "curl"})]
    server, client = conv.convert(recs, base)
    assert server.kind == SpanKind.SERVER and client.kind == SpanKind.CLIENT
    assert server.parent.span_id == 0x2 and server.parent.trace_id == 0xABC and client.parent is None
    assert server.status.status_code == StatusCode.ERROR
    assert server.resource.attributes["service.name"] == "web"       # the k8s owner wins
    assert client.resource.attributes["service.name"] == "curl"
    assert server.resource.attributes["host.name"] == "h"
    assert "process.pid" not in server.attributes and server.attributes["http.response.status_code"] == 503
    assert (server.start_time, server.end_time) == (10, 20)
