"""CPU per request: profile samples taken while their thread served an HTTP
request carry that request's link (trace id, span id), route and method to
every exporter. Known samples go in, and each output is read back with
its own reader: OTLP's link_table and link_index (the file exporter's JSON
too), pprof's labels as `go tool pprof` reads and filters them, and the
rows of top's CPU-by-route view."""
from __future__ import annotations

import asyncio
import json

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import ExportProfilesServiceRequest
from opentelemetry.sdk.resources import Resource

from collector.export.file import FileExporter
from collector.export.pprof import to_folded, to_pprof
from collector.export.profiles_otlp import build_request
from collector.records import Batch, Frame, Profile, ProfileSample
from collector.top.model import NO_SAMPLES, TopModel, sort_rows
from collector.top.snapshot import snapshot
from pprof_tool import go_pprof_runner, raw_samples

# Ids that catch a wrong byte order, width or sign: leading zero bytes, the top bit set, all ones.
T1, S1 = 0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331
T2, S2 = 0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7
T3, S3 = 0x80000000000000000000000000000001, 0x1
T4, S4 = (1 << 128) - 1, (1 << 64) - 1

HOT, COLD = [Frame("hot", 0x10), Frame("handler", 0x20), Frame("main", 0x30)], \
    [Frame("cold", 0x40), Frame("handler", 0x20), Frame("main", 0x30)]


def _shop(method: str, route: str, frames: list, count: int, link: tuple) -> ProfileSample:
    return ProfileSample({"process.pid": 10, "process.executable.name": "shop", "http.route": route,
                          "http.request.method": method}, frames, count, link)


def known_samples() -> list:
    """31 samples: shop's 10 in POST /checkout (two requests, one of them
    on two stacks), 4 in GET /cart, 1 in GET /checkout/confirm, 7 outside
    any request; db's 9, all outside any request."""
    return [_shop("POST", "/checkout", HOT, 5, (T1, S1)),
            _shop("POST", "/checkout", HOT, 3, (T2, S2)),   # A's stack and attributes, another request
            _shop("GET", "/cart", COLD, 4, (T3, S3)),
            _shop("POST", "/checkout", COLD, 2, (T1, S1)),  # A's request again
            _shop("GET", "/checkout/confirm", HOT, 1, (T4, S4)),
            ProfileSample({"process.pid": 10, "process.executable.name": "shop"}, [Frame("idle", 0x50)], 7),
            ProfileSample({"process.pid": 20, "process.executable.name": "db"}, [Frame("scan", 0x60)], 9)]


def known_profile() -> Profile:
    return Profile(known_samples(), start_time_ns=1_000, duration_ns=10**9, period_ns=10_101_010)


def id_bytes(link: tuple) -> tuple:
    trace_id, span_id = link
    return trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big")


# ------------------------------------------------------------------ OTLP

def _attributes(dictionary, sample) -> dict:
    out = {}
    for i in sample.attribute_indices:
        kv = dictionary.attribute_table[i]
        out[dictionary.string_table[kv.key_strindex]] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


def assert_links_exported(req: ExportProfilesServiceRequest, samples: list) -> None:
    d = req.dictionary
    table = [(link.trace_id, link.span_id) for link in d.link_table]
    assert table[0] == (b"", b""), "index 0 must stay the empty link"
    assert sorted(table[1:]) == sorted(id_bytes(link) for link in [(T1, S1), (T2, S2), (T3, S3), (T4, S4)])
    out = req.resource_profiles[0].scope_profiles[0].profiles[0].samples
    assert len(out) == len(samples) == 7, "samples with different links must stay separate samples"
    for given, got in zip(samples, out):
        assert list(got.values) == [given.count]
        if given.link is None:
            assert got.link_index == 0, given
        else:
            assert table[got.link_index] == id_bytes(given.link), given
        assert _attributes(d, got) == given.attributes
    # the first two differ only in their request
    assert out[0].stack_index == out[1].stack_index and out[0].attribute_indices == out[1].attribute_indices
    assert out[0].link_index != out[1].link_index
    assert out[0].link_index == out[3].link_index, "one request's link is one link_table entry"


def test_otlp_samples_point_into_a_deduplicated_link_table():
    prof = known_profile()
    assert_links_exported(build_request(Resource.create({}), {"cpu": [prof]}), prof.samples)


def test_the_file_exporter_carries_the_links(tmp_path):
    path = tmp_path / "out.jsonl"
    exp = FileExporter({"path": str(path), "histogram": "exponential"})
    prof = known_profile()
    assert exp.export(Batch(time_ns=2_000, resource=Resource.create({}), profiles={"cpu": [prof]}))
    exp.shutdown()
    line, = path.read_text().splitlines()
    assert_links_exported(json_format.Parse(line, ExportProfilesServiceRequest()), prof.samples)


# ------------------------------------------------------------------ pprof

@pytest.fixture(scope="module")
def go_pprof(tmp_path_factory):
    return go_pprof_runner(tmp_path_factory.mktemp("go"))


def expected_labels(smp: ProfileSample) -> tuple:
    labels = {k: str(v) for k, v in smp.attributes.items()}
    if smp.link:
        trace_id, span_id = id_bytes(smp.link)
        labels.update(trace_id=trace_id.hex(), span_id=span_id.hex())
    return tuple(sorted(labels.items()))


@pytest.fixture(scope="module")
def pprof_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pprof") / "cpu.pb.gz"
    path.write_bytes(to_pprof([known_profile()]))
    return str(path)


def test_pprof_samples_carry_their_request_as_labels(go_pprof, pprof_file):
    got = raw_samples(go_pprof("-raw", pprof_file))
    assert got == sorted((s.count, expected_labels(s)) for s in known_samples())
    checkout = dict(next(labels for n, labels in got if n == 5))
    assert (checkout["trace_id"], checkout["span_id"], checkout["http.route"], checkout["http.request.method"]) \
        == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "/checkout", "POST")


def test_pprof_tagfocus_keeps_one_routes_or_one_spans_samples(go_pprof, pprof_file):
    # a regular expression: anchored, or /checkout/confirm would match too
    route = raw_samples(go_pprof("-tagfocus=http.route=^/checkout$", "-raw", pprof_file))
    assert [n for n, _ in route] == [2, 3, 5]
    assert all(dict(labels)["http.route"] == "/checkout" for _, labels in route)
    span = raw_samples(go_pprof(f"-tagfocus=span_id=^{S1:016x}$", "-raw", pprof_file))
    assert [n for n, _ in span] == [2, 5]


def test_folded_stacks_are_unchanged_by_links():
    unlinked = [ProfileSample(s.attributes, s.frames, s.count) for s in known_samples()]
    assert to_folded([known_profile()]) == to_folded([Profile(unlinked, 1_000, 10**9, 10_101_010)]) == (
        "db;scan 9\nshop;idle 7\nshop;main;handler;cold 6\nshop;main;handler;hot 9\n")


# ------------------------------------------------------------------ top

def top_model(samples: list) -> TopModel:
    batch = Batch(time_ns=5_000_000_000, profiles={"cpu": [Profile(samples, 1_000, 10**9, 10_101_010)]})
    model = TopModel()
    model.update(json.loads(json.dumps(snapshot(batch, 10.0))))   # as /records sends it
    return model


def by_key(table) -> dict:
    return {row[:3]: row[3:] for row in table.rows}


def test_top_routes_view_counts_each_request_route_and_the_rest_per_process():
    table = top_model(known_samples()).table("routes")
    assert [c.title for c in table.columns] == ["PROCESS", "METHOD", "ROUTE", "SAMPLES", "CPU%"]
    rows = by_key(table)
    assert rows.keys() == {("shop", "POST", "/checkout"), ("shop", "GET", "/cart"),
                           ("shop", "GET", "/checkout/confirm"), ("shop", "-", "(no request)"),
                           ("db", "-", "(no request)")}
    for key, n in {("shop", "POST", "/checkout"): 10, ("shop", "GET", "/cart"): 4,
                   ("shop", "GET", "/checkout/confirm"): 1, ("shop", "-", "(no request)"): 7,
                   ("db", "-", "(no request)"): 9}.items():
        assert rows[key] == (n, pytest.approx(100 * n / 31)), key
    assert table.note == ""
    ordered = sort_rows(table, 3)   # by SAMPLES, the default
    assert [r[2] for r in ordered] == ["/checkout", "(no request)", "(no request)", "/cart", "/checkout/confirm"]
    assert cells_of(table, ("shop", "POST", "/checkout")) == ("shop", "POST", "/checkout", "10", "32.3")


def cells_of(table, key) -> tuple:
    return next(cells for row, cells in zip(table.rows, table.cells()) if row[:3] == key)


def test_top_routes_view_honours_the_filter():
    model = top_model(known_samples())
    shop = by_key(model.table("routes", "SHOP"))   # case-insensitive, as everywhere in top
    assert {k: v[0] for k, v in shop.items()} == {("shop", "POST", "/checkout"): 10, ("shop", "GET", "/cart"): 4,
                                                  ("shop", "GET", "/checkout/confirm"): 1,
                                                  ("shop", "-", "(no request)"): 7}
    assert shop[("shop", "GET", "/cart")][1] == pytest.approx(100 * 4 / 22)   # of the samples that pass
    db = model.table("routes", "db")
    assert db.rows == [("db", "-", "(no request)", 9, 100.0)]
    assert "no CPU sample was taken while serving a request" in db.note


def test_top_routes_view_without_samples_says_why():
    assert TopModel().table("routes").note == NO_SAMPLES
    assert top_model([]).table("routes").rows == []


def test_top_key_5_shows_the_routes_view():
    """The binding reaches the view: textual's headless pilot presses 5."""
    from textual.widgets import DataTable

    from collector.top.app import TopApp

    class Source:
        standalone, url = False, "http://agent/records"
        snap = top_model(known_samples()).current

        def fetch(self):
            return self.snap

    async def press_5() -> list:
        app = TopApp(Source())
        async with app.run_test(size=(160, 45)) as pilot:
            await pilot.press("5")
            await pilot.pause()
            widget = app.query_one("#table", DataTable)
            return [str(c.label) for c in widget.columns.values()], \
                [[str(v) for v in widget.get_row_at(i)] for i in range(widget.row_count)], app.view_name
    columns, rows, view = asyncio.run(press_5())
    assert view == "routes"
    assert columns == ["PROCESS", "METHOD", "ROUTE", "SAMPLES↓", "CPU%"]
    assert rows[0] == ["shop", "POST", "/checkout", "10", "32.3"] and len(rows) == 5
