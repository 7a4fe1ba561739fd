"""The OTLP exporter splits a big collection's metrics across requests
(max_points_per_request), over gRPC and HTTP, to real receivers: every
point arrives once, in requests no bigger than the limit."""
from __future__ import annotations

import pytest
from opentelemetry.sdk.resources import Resource

from collector.config import OTLP_SCHEMA, parse_section
from collector.export.otlp import OtlpExporter
from collector.records import Batch, Counter, Instrument

C = Instrument("otelbpf.test.items", "{item}", "test counter")


def _config(endpoint: str, protocol: str, limit: int) -> dict:
    raw = {"endpoint": endpoint, "protocol": protocol, "insecure": True, "max_points_per_request": limit}
    return parse_section(raw, OTLP_SCHEMA, "exporters.otlp")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_collection_is_split_into_requests_of_at_most_the_limit(protocol, grpc_receiver, http_receiver):
    rx = grpc_receiver if protocol == "grpc" else http_receiver
    exporter = OtlpExporter(_config(rx.endpoint, protocol, 3))
    records = [Counter(C, {"item": i}, 100 + i, 1) for i in range(10)]
    try:
        assert exporter.export(Batch(time_ns=2, resource=Resource.create({}), metrics={"s": records}))
    finally:
        exporter.shutdown()
    with rx.rx.lock:
        requests = list(rx.rx.metrics)
    sizes, got = [], {}
    for req in requests:
        n = 0
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for dp in m.sum.data_points:
                        item = next(a.value.int_value for a in dp.attributes if a.key == "item")
                        assert item not in got, f"point {item} sent twice"
                        got[item] = dp.as_int
                        n += 1
        sizes.append(n)
    assert sizes == [3, 3, 3, 1], sizes
    assert got == {i: 100 + i for i in range(10)}
