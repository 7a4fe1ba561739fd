"""The HTTP/2 decoder (probes/l7/http2.py) on real peers' bytes: curl,
nghttp and h2load against nginx (cleartext HTTP/2), grpcio client and
server, recorded by a TCP relay and walked into FrameEvents as the kernel
would send them (tests/h2_recordings.py). What the peers did (their own reports,
and a full decode of the same bytes with the stock hpack.Decoder) is the
ground truth. Then joins mid-way, lost records, and bad input."""
from __future__ import annotations

import random
import shutil
import time

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import h2_recordings as hp
from h2_recordings import C2S, S2C, conversation, frame, walk
from probes.l7 import hpack_tolerant
from probes.l7.hpack_tolerant import Decoder
from probes.l7.http2 import (CLOSED, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED,
                             PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, STATS, FrameEvent, Http2Tracker)

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def run(events, tracker=None):
    tr = tracker or Http2Tracker()
    for ev in events:
        tr.feed(ev)
    assert tr.stats["internal_error"] == 0
    return tr.take_exchanges(), tr


def tp(i: int) -> str:
    return "00-%032x-%016x-01" % (0xABC0000 + i, 0x1000 + i)


def most_at_once(exs) -> int:
    """The most exchanges open at one time."""
    marks = sorted([(x.start_ns, 1) for x in exs] + [(x.end_ns, -1) for x in exs])
    n = top = 0
    for _, d in marks:
        n += d
        top = max(top, n)
    return top


def same_as_truth(ex, truth, strict=True):
    """Each field of ex is what the bytes say (strict: and nothing is missing)."""
    t = truth[ex.stream_id]
    req = t["req"][0]
    final = [h for h in t["resp"] if ":status" in h and not h[":status"].startswith("1")]
    want = {"method": req.get(":method"), "path": req.get(":path"), "scheme": req.get(":scheme"),
            "authority": req.get(":authority"), "traceparent": req.get("traceparent"),
            "user_agent": req.get("user-agent"), "content_type": req.get("content-type"),
            "grpc_timeout": req.get("grpc-timeout"),
            "status": int(final[0][":status"]) if final else None,
            "resp_content_type": final[0].get("content-type") if final else None}
    gs = [h["grpc-status"] for h in t["resp"] if "grpc-status" in h]
    want["grpc_status"] = int(gs[-1]) if gs else None
    for k, v in want.items():
        got = getattr(ex, k)
        if strict or got is not None:
            assert got == v, (ex.stream_id, k, got, v)
        elif v is not None:
            assert ex.partial, (ex.stream_id, k)


# --- recordings of real peers (once per module) -----------------------------------

@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """Recordings: curl (one request per connection: /hello with a
    traceparent, /missing, /created with a 2500-byte header, /hello with a
    9000-byte one before the traceparent), nghttp (30 requests multiplexed
    on one connection, with priorities), h2load (300 requests, 10 at a time,
    one connection). Each with what the client reported."""
    if not (shutil.which("nginx") and shutil.which("curl") and shutil.which("nghttp") and shutil.which("h2load")):
        pytest.skip("needs nginx, curl and nghttp2-client (nghttp, h2load)")
    rnd = random.Random(7)
    big = "".join(rnd.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9000))
    out = {}
    with hp.nginx_h2c(tmp_path_factory.mktemp("nginx")) as port:
        relay = hp.Relay(port)
        try:
            runs = [("hello", ["/hello"], [f"traceparent: {TP}"]), ("missing", ["/missing"], []),
                    ("created", ["/created"], ["x-mid: " + big[:2500], f"traceparent: {TP}"]),
                    ("bighdr", ["/hello"], ["x-big: " + big, f"traceparent: {TP}"])]
            for name, paths, headers in runs:
                n = len(relay.conns)
                codes = hp.curl(relay.port, paths, headers)
                relay.wait_closed(n + 1)
                out[name] = (relay.conns[n], codes)
            paths = [f"/{p}?i={i}" for i in range(10) for p in ("hello", "missing", "big")]
            n = len(relay.conns)
            res = hp.subprocess.run(["nghttp", "-n", "-s", "-H", f"traceparent: {TP}"]
                                    + [f"http://127.0.0.1:{relay.port}{p}" for p in paths],
                                    capture_output=True, text=True, timeout=30, check=True).stdout
            relay.wait_closed(n + 1)
            codes = sorted((ln.split()[6], int(ln.split()[4])) for ln in res.splitlines()
                           if ln.split() and ln.split()[0].isdigit())
            out["nghttp"] = (relay.conns[n], codes)
            n = len(relay.conns)
            res = hp.subprocess.run(["h2load", "-n", "300", "-c", "1", "-m", "10",
                                     f"http://127.0.0.1:{relay.port}/hello"],
                                    capture_output=True, text=True, timeout=30, check=True).stdout
            relay.wait_closed(n + 1)
            out["h2load"] = (relay.conns[n], res)
        finally:
            relay.close()
    return out


@pytest.fixture(scope="module")
def grpc_rec():
    """One gRPC connection: 12 unary calls in turn (unique traceparents), a
    NOT_FOUND, a server stream of 5, four Sleep calls at once (300, 30, 150,
    80 ms), a cancelled Sleep, then 6 more unary and 3 Again calls (a method
    called only in that second half). With the client's results and the time
    between the two halves."""
    grpc = pytest.importorskip("grpc")
    res = {"unary": [], "fail": None, "stream": None, "sleep": {}}
    with hp.grpc_server() as port:
        relay = hp.Relay(port)
        ch = hp.grpc_channel(relay.port)
        try:
            for i in range(12):
                assert hp.grpc_call(ch, "Unary", b"u%d" % i, tp(i)).result() == b"u%d" % i
                res["unary"].append(tp(i))
            try:
                hp.grpc_call(ch, "Fail", b"x", tp(100)).result()
            except grpc.RpcError as e:
                res["fail"] = (e.code().value[0], e.details())
            res["stream"] = list(hp.grpc_call(ch, "Stream", b"5", tp(101), stream=True))
            calls = {ms: hp.grpc_call(ch, "Sleep", str(ms).encode(), tp(200 + ms)) for ms in (300, 30, 150, 80)}
            for ms, f in calls.items():
                assert f.result() == str(ms).encode()
            f = hp.grpc_call(ch, "Sleep", b"2000", tp(999))
            time.sleep(0.2)
            f.cancel()
            time.sleep(0.1)
            res["half"] = time.monotonic_ns()
            time.sleep(0.05)
            for i in range(6):
                hp.grpc_call(ch, "Unary", b"v%d" % i, tp(300 + i)).result()
                if i % 2 == 0:
                    hp.grpc_call(ch, "Again", b"a%d" % i, tp(400 + i)).result()
        finally:
            ch.close()
            try:
                relay.wait_closed(1)
            finally:
                relay.close()
    return relay.conns[0], res


# --- RFC 7541 appendix C: the HPACK anchor -------------------------------------------

C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff", "828684be5886a8eb10649cbf",
      "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
C6 = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
      "4883640effc1c0bf",
      "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f"
      "3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]


def table(dec):
    return [(e[0].decode(), e[1].decode()) for e in dec.dyn], dec.size


def test_rfc7541_c4_requests_with_huffman():
    stats = dict.fromkeys(STATS, 0)
    dec = Decoder(stats)
    got = [dec.decode(bytes.fromhex(h)) for h in C4]
    base = {b":method": b"GET", b":scheme": b"http", b":path": b"/", b":authority": b"www.example.com"}
    assert got[0] == (base, False, False)
    assert got[1] == (base, False, False)      # cache-control is read over, not kept
    assert got[2] == ({b":method": b"GET", b":scheme": b"https", b":path": b"/index.html",
                       b":authority": b"www.example.com"}, False, False)
    assert table(dec) == ([("custom-key", "custom-value"), ("cache-control", "no-cache"),
                           (":authority", "www.example.com")], 164)
    # The same three blocks as HEADERS of one connection, answered 200 each.
    enc = hpack.Encoder()
    steps = []
    for i, h in enumerate(C4):
        sid = 2 * i + 1
        steps += [(C2S, frame(HEADERS, END_HEADERS | END_STREAM, sid, bytes.fromhex(h))),
                  (S2C, frame(HEADERS, END_HEADERS | END_STREAM, sid, enc.encode([(":status", "200")])))]
    exs, tr = run(walk(conversation(*steps)))
    assert [(x.stream_id, x.method, x.scheme, x.path, x.authority, x.status, x.outcome, x.partial) for x in exs] == [
        (1, "GET", "http", "/", "www.example.com", 200, "ok", False),
        (3, "GET", "http", "/", "www.example.com", 200, "ok", False),
        (5, "GET", "https", "/index.html", "www.example.com", 200, "ok", False)]
    # Joined at the third block: the dynamic entry it refers to (:authority, 63) is unknown.
    dec = Decoder(stats, synced=False)
    assert dec.decode(bytes.fromhex(C4[2])) == (
        {b":method": b"GET", b":scheme": b"https", b":path": b"/index.html"}, True, False)
    assert table(dec) == ([("custom-key", "custom-value")], 54)
    assert stats["hpack_error"] == 0


def test_rfc7541_c6_responses_with_eviction():
    """C.6: a 256-byte table, entries evicted as new ones come: the table
    after each response is the RFC's."""
    stats = dict.fromkeys(STATS, 0)
    dec = Decoder(stats, max_size=256)
    assert dec.decode(bytes.fromhex(C6[0]))[0] == {b":status": b"302"}
    assert table(dec) == ([("location", "https://www.example.com"), ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                           ("cache-control", "private"), (":status", "302")], 222)
    assert dec.decode(bytes.fromhex(C6[1])) == ({b":status": b"307"}, False, False)
    assert table(dec) == ([(":status", "307"), ("location", "https://www.example.com"),
                           ("date", "Mon, 21 Oct 2013 20:13:21 GMT"), ("cache-control", "private")], 222)
    assert dec.decode(bytes.fromhex(C6[2])) == ({b":status": b"200"}, False, False)
    assert table(dec) == ([("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
                           ("content-encoding", "gzip"), ("date", "Mon, 21 Oct 2013 20:13:22 GMT")], 215)
    assert stats["hpack_error"] == 0


# --- nginx -------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_curl_against_nginx(nginx, side, chunk):
    """One request per connection as curl sent it and nginx answered; the
    same whichever end the traced process is and however the reads split
    the bytes (7 or 1 byte at a time: every piece boundary moves)."""
    for name in ("hello", "missing", "created"):
        rec, codes = nginx[name]
        if chunk:
            rec = hp.rechunk(rec, chunk)
        exs, tr = run(walk(rec, side=side))
        assert [(x.path, x.status) for x in exs] == codes, name
        x, = exs
        same_as_truth(x, hp.truth(rec))
        assert (x.method, x.scheme, x.user_agent, x.outcome, x.partial, x.tid) == (
            "GET", "http", "curl/7.88.1", "ok", False, 101)
        assert x.role == (1 if side == "server" else 2)
        assert x.traceparent == (None if name == "missing" else TP)
        assert x.start_ns < x.end_ns
        assert tr.stats["truncated_block"] == 0 and tr.stats["hpack_error"] == 0


def test_header_block_over_the_kernels_cap(nginx):
    """A 9000-byte header: the kernel sends 4096 bytes of that HEADERS. The
    block is cut: the pseudo-headers before the cut decode, the traceparent
    after it is lost, the exchange is partial and still paired."""
    rec, codes = nginx["bighdr"]
    frames = [f for f in hp.frames(rec, C2S) if f[1] == HEADERS]
    assert len(frames[0][4]) > 4096
    exs, tr = run(walk(rec))
    x, = exs
    assert (x.method, x.path, x.status, x.traceparent, x.partial) == ("GET", "/hello", codes[0][1], None, True)
    assert tr.stats["truncated_block"] == 1 and tr.stats["partial"] == 1


def test_nghttp_multiplexed_with_priorities(nginx):
    """30 requests at once on one connection (nghttp sends HEADERS with the
    PRIORITY flag and PRIORITY frames): every one paired with its own
    response, as nghttp reported them, and overlapping in time."""
    rec, codes = nginx["nghttp"]
    heads = [f for f in hp.frames(rec, C2S) if f[1] == HEADERS]
    assert any(f[2] & PRIORITY_FLAG for f in heads)
    truth = hp.truth(rec)
    for chunk in (None, 5):
        exs, tr = run(walk(hp.rechunk(rec, chunk) if chunk else rec))
        assert sorted((x.path, x.status) for x in exs) == codes
        for x in exs:
            same_as_truth(x, truth)
            assert x.traceparent == TP and x.outcome == "ok" and not x.partial
        assert most_at_once(exs) >= 10
        assert tr.stats["unanswered"] == tr.stats["unpaired"] == 0


def test_h2load_many_streams(nginx):
    """300 requests, 10 open at a time: as many exchanges as h2load counted,
    each paired with its own response (interleaved frames), most blocks
    decoded from the cache (the repeat blocks leave the table unchanged)."""
    rec, report = nginx["h2load"]
    assert "300 succeeded" in report
    hpack_tolerant._CACHE.clear()
    exs, tr = run(walk(rec))
    assert len(exs) == 300 and tr.stats["exchanges"] == 300
    truth = hp.truth(rec)
    for x in exs:
        same_as_truth(x, truth)
    assert {(x.method, x.path, x.status, x.outcome, x.partial) for x in exs} == {("GET", "/hello", 200, "ok", False)}
    assert len({x.stream_id for x in exs}) == 300
    assert most_at_once(exs) >= 5
    assert 0 < len(hpack_tolerant._CACHE) < 20


# --- gRPC --------------------------------------------------------------------------

def grpc_exchanges(grpc_rec, **kw):
    rec, res = grpc_rec
    return run(walk(rec, **kw))


def test_grpc_calls(grpc_rec):
    rec, res = grpc_rec
    exs, tr = grpc_exchanges(grpc_rec)
    truth = hp.truth(rec)
    by_tp = {x.traceparent: x for x in exs}
    assert len(by_tp) == len(exs) == 12 + 1 + 1 + 4 + 1 + 6 + 3
    for x in exs:
        same_as_truth(x, truth)
        assert x.is_grpc and x.method == "POST" and x.scheme == "http" and x.grpc_timeout
        assert x.grpc_method() == ("test.Echo", x.path.rsplit("/", 1)[1])
        assert x.outcome == "reset" or x.resp_content_type.startswith("application/grpc")
    for t in res["unary"]:
        x = by_tp[t]
        assert (x.path, x.status, x.grpc_status, x.outcome, x.partial) == ("/test.Echo/Unary", 200, 0, "ok", False)
    x = by_tp[tp(100)]
    assert (x.path, x.status, x.grpc_status, x.grpc_message) == ("/test.Echo/Fail", 200, res["fail"][0],
                                                                res["fail"][1])
    assert res["fail"] == (5, "no such thing: x")
    x = by_tp[tp(101)]
    assert (x.path, x.grpc_status, x.outcome) == ("/test.Echo/Stream", 0, "ok") and len(res["stream"]) == 5
    # The cancelled call: the client's RST_STREAM(CANCEL) ended it, no response came.
    x = by_tp[tp(999)]
    assert (x.outcome, x.error_code, x.status, x.grpc_status) == ("reset", 8, None, None)
    assert 150e6 < x.end_ns - x.start_ns < 1000e6
    assert tr.stats["unanswered"] == 1 and tr.stats["partial"] == 0
    # Four calls at once: each timed by its own response.
    sleeps = {ms: by_tp[tp(200 + ms)] for ms in (300, 30, 150, 80)}
    for ms, x in sleeps.items():
        assert ms * 1e6 <= x.end_ns - x.start_ns < ms * 1e6 + 150e6, ms
    assert sorted(sleeps, key=lambda ms: sleeps[ms].end_ns - sleeps[ms].start_ns) == [30, 80, 150, 300]
    assert max(x.start_ns for x in sleeps.values()) < min(x.end_ns for x in sleeps.values())


def test_grpc_from_the_client_side_and_split_reads(grpc_rec):
    rec, _ = grpc_rec
    ref = [x._replace(role=2, lport=x.rport, rport=x.lport) for x in grpc_exchanges(grpc_rec)[0]]
    for chunk in (3, 64):
        exs, tr = run(walk(hp.rechunk(rec, chunk), side="client"))
        assert exs == ref


# --- joins mid-way, lost records -----------------------------------------------------

def cut_at(rec, ts):
    """Frame boundaries of both directions at time ts: what a tracer started then sees."""
    n = {d: sum(len(b) for t, dd, b in rec if dd == d and t < ts) for d in (C2S, S2C)}
    return hp.frame_boundary(rec, C2S, n[C2S]), hp.frame_boundary(rec, S2C, n[S2C])


def test_grpc_joined_mid_way(grpc_rec):
    """The tracer comes between the two halves (fresh=False, no role hint):
    every later call is an exchange; what it says is true; fields coded as
    references to entries inserted before the join are missing (partial),
    entries inserted after it (Again's :path) are known."""
    rec, res = grpc_rec
    truth = hp.truth(rec)
    skip = cut_at(rec, res["half"])
    exs, tr = run(walk(rec, fresh=False, skip=skip))
    assert len(exs) == 9
    assert all(x.role == 1 for x in exs)               # told by the first request seen
    for x in exs:
        same_as_truth(x, truth, strict=False)
        assert x.method == "POST" and x.status == 200 and x.outcome == "ok"
    again = [x for x in exs if x.path == "/test.Echo/Again"]
    assert len(again) == 3                             # inserted after the join, then referred to
    unary = [x for x in exs if x not in again]
    assert any(x.path is None and x.partial for x in unary)   # inserted before the join
    assert tr.stats["unpaired"] == 0 and tr.stats["hpack_error"] == 0
    assert tr.stats["partial"] == sum(x.partial for x in exs)


def test_nginx_joined_mid_way_streams_in_flight(nginx):
    """h2load's connection joined half-way through its bytes: responses of
    streams opened before are unpaired; every stream opened after is an
    exchange; nothing false."""
    rec, _ = nginx["h2load"]
    truth = hp.truth(rec)
    mid = rec[len(rec) // 2][0]
    skip = cut_at(rec, mid)
    exs, tr = run(walk(rec, fresh=False, skip=skip))
    after = {f[3] for f in hp.frames(rec, C2S) if f[1] == HEADERS and f[0] >= skip[C2S]}
    assert {x.stream_id for x in exs} == after
    for x in exs:
        same_as_truth(x, truth, strict=False)
        assert x.method == "GET" and x.status == 200
    assert tr.stats["unpaired"] == len({f[3] for f in hp.frames(rec, S2C) if f[1] == HEADERS and f[0] >= skip[S2C]}
                                       - after)


def test_lost_records_gap(grpc_rec):
    """Records of both directions dropped in the middle (the ring was full);
    the next record of each direction says gap. Streams whose requests were
    lost are missing; those after are exchanges, true where decoded."""
    rec, res = grpc_rec
    truth = hp.truth(rec)
    evs = walk(rec)
    lo, hi = len(evs) // 3, len(evs) // 3 + 40
    dropped = evs[lo:hi]
    kept = evs[:lo]
    flagged = set()
    for ev in evs[hi:]:
        if ev.ftype != CLOSED and ev.direction not in flagged:
            flagged.add(ev.direction)
            ev = ev._replace(gap=True)
        kept.append(ev)
    exs, tr = run(kept)
    lost = {ev.stream_id for ev in dropped if ev.ftype == HEADERS and ev.direction == 0}
    full = {x.stream_id for x in run(evs)[0]}
    assert lost and full - lost <= {x.stream_id for x in exs} <= full
    for x in exs:
        same_as_truth(x, truth, strict=False)


def test_lost_piece_of_a_header_block(nginx):
    """The 2500-byte request block comes in 3 pieces; without the second,
    the block is cut there: decoded up to it, the exchange is partial."""
    rec, codes = nginx["created"]
    evs = walk(rec)
    pieces = [i for i, ev in enumerate(evs) if ev.ftype == HEADERS and ev.direction == 0]
    assert len(pieces) >= 3 and [evs[i].piece_off for i in pieces[:3]] == [0, 1024, 2048]
    exs, tr = run(evs[:pieces[1]] + evs[pieces[1] + 1:])
    x, = exs
    assert (x.path, x.status, x.partial, x.traceparent) == ("/created", 201, True, None)
    assert tr.stats["truncated_block"] == 1


# --- frames no real peer here sends: CONTINUATION, padding, GOAWAY, push ------------

def test_continuation_padding_interleaving_goaway():
    """Streams 1, 3, 5, 7 open at once, their frames interleaved: a request
    in HEADERS + 2 CONTINUATIONs, one PADDED with PRIORITY, a 100 before a
    200, a PUSH_PROMISE and a pushed response (not traced), trailers after
    DATA, RST_STREAM from the server, GOAWAY (last stream 3: 7 was never
    processed)."""
    ce, se = hpack.Encoder(), hpack.Encoder()

    def req(path, *extra):
        return ce.encode([(":method", "POST"), (":scheme", "https"), (":path", path), (":authority", "a.example"),
                          ("content-type", "application/grpc"), *extra])

    r1 = req("/s.A/One", ("traceparent", tp(1)))
    r3 = req("/s.A/Two")
    ok = [(":status", "200"), ("content-type", "application/grpc")]
    steps = [
        (C2S, frame(HEADERS, 0, 1, r1[:5]) + frame(CONTINUATION, 0, 1, r1[5:9])
         + frame(CONTINUATION, END_HEADERS, 1, r1[9:])),                                      # rec[1]
        (C2S, frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 3,
                    b"\x03" + b"\x00\x00\x00\x01\x10" + r3 + b"\0" * 3)),                     # rec[2]
        (S2C, frame(HEADERS, END_HEADERS | PADDED, 3, b"\x02" + se.encode(ok) + b"\0" * 2)),   # rec[3]
        (C2S, frame(HEADERS, END_HEADERS, 5, req("/s.A/Three")) + frame(DATA, END_STREAM, 5, b"")),
        (S2C, frame(HEADERS, END_HEADERS, 1, se.encode([(":status", "100")]))),
        (S2C, frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02" + se.encode([(":method", "GET"),
                                                                                    (":path", "/p")]))),
        (S2C, frame(HEADERS, END_HEADERS, 1, se.encode(ok))),
        (S2C, frame(DATA, 0, 3, b"xx") + frame(HEADERS, END_HEADERS, 2, se.encode([(":status", "200")]))
         + frame(DATA, END_STREAM, 2, b"")),
        (C2S, frame(HEADERS, END_HEADERS, 7, req("/s.A/Four"))),                              # rec[9]
        (S2C, frame(HEADERS, END_HEADERS | END_STREAM, 3, se.encode([("grpc-status", "7"),
                                                                     ("grpc-message", "no%20way")]))),  # rec[10]
        (S2C, frame(RST_STREAM, 0, 5, (2).to_bytes(4, "big"))),                                # rec[11]
        (S2C, frame(GOAWAY, 0, 0, (3).to_bytes(4, "big") + (0).to_bytes(4, "big"))),           # rec[12]
        (S2C, frame(DATA, 0, 1, b"x")),
        (S2C, frame(HEADERS, END_HEADERS | END_STREAM, 1, se.encode([("grpc-status", "0")]))),  # rec[14]
    ]
    rec = conversation(*steps)
    exs, tr = run(walk(rec))
    got = [(x.stream_id, x.path, x.status, x.grpc_status, x.grpc_message, x.outcome, x.error_code, x.partial,
            x.start_ns, x.end_ns) for x in exs]
    ts = [t for t, _, _ in rec]
    assert got == [
        (3, "/s.A/Two", 200, 7, "no way", "ok", None, False, ts[2], ts[10]),
        (5, "/s.A/Three", None, None, None, "reset", 2, False, ts[4], ts[11]),
        (7, "/s.A/Four", None, None, None, "goaway", 0, False, ts[9], ts[12]),
        (1, "/s.A/One", 200, 0, None, "ok", None, False, ts[1], ts[14])]
    assert exs[3].traceparent == tp(1) and exs[3].grpc_method() == ("s.A", "One")
    assert tr.stats["unanswered"] == 2 and tr.stats["unpaired"] == 0 and tr.stats["bad_frame"] == 0
    # Every 2 bytes in a read of their own: the same.
    assert run(walk(hp.rechunk(rec, 2)))[0] == exs


def test_close_ends_open_streams_unanswered_and_frees_the_connection():
    ce = hpack.Encoder()
    rec = conversation((C2S, frame(HEADERS, END_HEADERS | END_STREAM, 1, ce.encode([
        (":method", "GET"), (":scheme", "http"), (":path", "/slow"), (":authority", "x")]))))
    exs, tr = run(walk(rec))
    x, = exs
    assert (x.path, x.outcome, x.status) == ("/slow", "unanswered", None)
    assert tr.stats["unanswered"] == 1 and not tr._conns


def test_role_told_by_the_first_response_when_joined():
    """Joined mid-way and the first block seen is a response (of a stream
    opened before): the role comes from it and the next stream pairs."""
    ce, se = hpack.Encoder(), hpack.Encoder()
    rec = [(1, S2C, frame(HEADERS, END_HEADERS, 1, se.encode([(":status", "204")])) + frame(DATA, END_STREAM, 1, b"")),
           (2, C2S, frame(HEADERS, END_HEADERS | END_STREAM, 3, ce.encode([(":method", "GET"), (":path", "/n")]))),
           (3, S2C, frame(HEADERS, END_HEADERS | END_STREAM, 3, se.encode([(":status", "200")])))]
    for side, role in (("server", 1), ("client", 2)):
        exs, tr = run(walk(rec, side=side, fresh=False, preface=False))
        assert [(x.stream_id, x.path, x.status, x.role) for x in exs] == [(3, "/n", 200, role)]
        assert tr.stats["unpaired"] == 1


# --- bad input ----------------------------------------------------------------------

def ev(block: bytes = b"", ftype=HEADERS, flags=END_HEADERS, sid=1, direction=0, conn=1, pos=0, fresh=True,
       length=None, off=0, role=1, ts=1):
    return FrameEvent(conn, ts, pos, 10, 11, b"\0" * 16, b"\0" * 16, 1, 2, 10,
                      len(block) if length is None else length, sid, off, ftype, flags, direction, False, role,
                      fresh, False, "x", block)


def req_block(enc=None, path="/"):
    return (enc or hpack.Encoder()).encode([(":method", "GET"), (":scheme", "http"), (":path", path),
                                            (":authority", "h")])


def test_hpack_bomb_stops_at_the_list_cap():
    """One 4000-byte entry inserted, then referred to 4000 times (16 MB
    decoded from 8 KB): decoding stops at 64 KiB, fast; the request's
    pseudo-headers before it still count."""
    big = b"\x40\x01x" + bytes(hpack.hpack.encode_integer(4000, 7)) + b"v" * 4000   # literal, indexed, name "x"
    block = bytes.fromhex("828684") + b"\x41\x01h" + big + b"\xbe" * 4000
    t = time.monotonic()
    tr = Http2Tracker()
    for i in range(4):                      # CONTINUATIONs carry it: the kernel sends up to 4096 bytes of each frame
        chunk = block[i * 3000:(i + 1) * 3000]
        tr.feed(ev(chunk, ftype=HEADERS if i == 0 else CONTINUATION, flags=END_HEADERS if i == 3 else 0,
                   pos=i * 4000))
    tr.feed(ev(hpack.Encoder().encode([(":status", "200")]), flags=END_HEADERS | END_STREAM, direction=1))
    exs = tr.take_exchanges()
    assert time.monotonic() - t < 1
    assert tr.stats["oversized"] == 1 and tr.stats["internal_error"] == 0
    x, = exs
    assert (x.method, x.path, x.status, x.partial) == ("GET", "/", 200, True)


def test_table_churn_size_updates_and_many_tiny_fields():
    stats = dict.fromkeys(STATS, 0)
    dec = Decoder(stats)
    # 10000 insertions of tiny entries: the table stays within its size.
    for _ in range(10):
        block = b"".join(b"\x40\x01a\x01" + bytes([48 + i % 10]) for i in range(1000))
        fields, missing, bad = dec.decode(block)
        assert not bad and not missing and dec.size <= 4096 and len(dec.dyn) == 4096 // 34
    # A size update past any sane limit is clamped; table memory stays bounded.
    dec.decode(b"\x3f\xe1\xff\xff\x07" + b"\x82")
    assert stats["table_capped"] == 1 and dec.max_size == hpack_tolerant.MAX_TABLE
    for _ in range(10):
        dec.decode(b"".join(b"\x40\x01b\x01" + bytes([48 + i % 10]) for i in range(1000)))
        assert dec.size <= hpack_tolerant.MAX_TABLE
    assert len(dec.dyn) == hpack_tolerant.MAX_TABLE // 34
    # A size update after a field is malformed.
    assert dec.decode(b"\x82\x20")[2] and stats["hpack_error"] == 1
    # 64 KiB worth of tiny static fields: stopped at the cap.
    fields, missing, bad = dec.decode(b"\x84" * 5000)
    assert stats["oversized"] == 1 and missing and not bad


@pytest.mark.parametrize("block", [
    b"\x80",                                # index 0
    b"\xff\xff\xff\xff\xff\xff\x7f",       # an integer of 6 continuation bytes
    b"\x40\x85abc",                         # name string past the end of the block
    b"\x00\x81\xff\x01a",                   # Huffman garbage (a code of eight 1 bits: EOS padding > 7 bits)
    b"\x00\x84\xff\xff\xff\xff\x01a",       # Huffman coding EOS
    b"\x82\x0f\x01\x01x\x84",               # a regular header, then a pseudo-header
    b"\x00\x04:foo\x01x",                   # an unknown pseudo-header
], ids=["index0", "long-int", "string-past-end", "huffman-padding", "huffman-eos", "pseudo-after", "bad-pseudo"])
def test_malformed_blocks(block):
    tr = Http2Tracker()
    tr.feed(ev(block))
    tr.feed(ev(b"\x88", flags=END_HEADERS | END_STREAM, direction=1))
    tr.feed(ev(ftype=CLOSED))
    assert tr.take_exchanges() == []
    assert tr.stats["hpack_error"] == 1 and tr.stats["internal_error"] == 0 and not tr._conns


def test_truncated_frames_and_orphans():
    tr = Http2Tracker()
    blk = req_block(path="/a")
    tr.feed(ev(blk[:4], length=len(blk)))                               # rest never comes
    tr.feed(ev(b"", ftype=DATA, flags=END_STREAM, sid=1, pos=50))
    tr.feed(ev(blk, ftype=CONTINUATION, sid=9, pos=60))                 # CONTINUATION of nothing
    tr.feed(ev(blk[5:], sid=11, off=5, length=len(blk), pos=90))        # start of a frame missed
    tr.feed(ev(b"\x08", flags=END_HEADERS | PADDED, sid=13, pos=120))   # padding longer than the frame
    tr.feed(ev(b"", sid=0, pos=130))                                    # HEADERS on stream 0
    tr.feed(ev(b"\x01", ftype=RST_STREAM, sid=1, pos=140))              # short RST_STREAM
    tr.feed(ev(b"\x00", ftype=GOAWAY, pos=150))                         # short GOAWAY
    tr.feed(ev(ftype=CLOSED))
    assert tr.stats["internal_error"] == 0
    assert tr.stats["truncated_block"] == 3 and tr.stats["bad_frame"] == 2
    for x in tr.take_exchanges():           # what is there is true: the cut request's method
        assert x.method in ("GET", None) and x.path is None and x.partial


def test_given_up_while_one_record_finds_more():
    """The third bad block ends a frame left pending, and the same record
    is itself a bad frame: the connection is given up once."""
    tr = Http2Tracker()
    tr.feed(ev(b"\x80", pos=0))
    tr.feed(ev(b"\x80", sid=3, pos=10))
    tr.feed(ev(b"\x80\x80", sid=5, pos=20, length=30))                 # pending
    tr.feed(ev(b"", sid=0, pos=60)._replace(gap=True))                 # ends it, and is on stream 0
    tr.feed(ev(req_block(), sid=7, pos=70))
    tr.feed(ev(ftype=CLOSED))
    assert tr.take_exchanges() == []
    assert (tr.stats["not_http2"], tr.stats["hpack_error"], tr.stats["internal_error"]) == (1, 3, 0)
    assert not tr._conns and not tr._ignored


def test_stream_and_connection_floods_are_bounded():
    enc = hpack.Encoder()
    tr = Http2Tracker()
    for i in range(5000):
        tr.feed(ev(req_block(enc, f"/{i}"), sid=2 * i + 1, pos=i * 100))
    assert len(tr._conns[1].streams) == 1000 and tr.stats["streams_dropped"] == 4000
    tr.feed(ev(ftype=CLOSED))
    assert len(tr.take_exchanges()) == 1000 and tr.stats["unanswered"] == 1000 and not tr._conns
    tr = Http2Tracker(max_conns=100)
    for c in range(1000):
        tr.feed(ev(req_block(), conn=c))
    assert len(tr._conns) == 100 and tr.stats["connections_dropped"] == 900
    for c in range(1000):
        tr.feed(ev(ftype=CLOSED, conn=c))
    assert not tr._conns and tr.stats["internal_error"] == 0


@pytest.mark.parametrize("fresh", [True, False])
def test_not_http2_bytes_make_no_exchanges(fresh):
    """Random bytes and an HTTP/1.1 conversation walked as if they were
    HTTP/2 frames (the kernel mistaking them): no exchange, no exception,
    connections given up and counted."""
    rnd = random.Random(1)
    tr = Http2Tracker()
    for seed in range(300):
        rec = [(i, rnd.choice((C2S, S2C)), rnd.randbytes(rnd.randrange(1, 3000))) for i in range(20)]
        for e in walk(rec, conn_id=seed, fresh=fresh, preface=False):
            tr.feed(e)
    h1 = [(1, C2S, b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl\r\n\r\n"),
          (2, S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")]
    # HTTP/1 text as frames: "GET / HTTP" is a 4.6 MB frame of type 0x20: nothing interesting.
    for e in walk(h1, conn_id=999, fresh=fresh, preface=False):
        tr.feed(e)
    # Frames that look right around blocks that are not HPACK.
    for c in range(1000, 1100):
        for i in range(5):
            tr.feed(ev(rnd.randbytes(40), sid=2 * i + 1, conn=c, pos=i * 50, fresh=fresh))
        tr.feed(ev(ftype=CLOSED, conn=c))
    assert tr.take_exchanges() == []
    assert tr.stats["internal_error"] == 0 and tr.stats["not_http2"] >= 100
    assert not tr._conns and not tr._ignored


events = st.builds(
    FrameEvent, conn_id=st.integers(0, 3), ts_ns=st.integers(0, 10**12), frame_pos=st.integers(0, 10**6),
    tgid=st.just(1), tid=st.just(2), laddr=st.just(b"\0" * 16), raddr=st.just(b"\0" * 16), lport=st.just(1),
    rport=st.just(2), family=st.just(10), length=st.integers(0, 1 << 24), stream_id=st.integers(0, 9),
    piece_off=st.integers(0, 5000), ftype=st.sampled_from([0, 1, 3, 5, 7, 9, 0xFF, 4]), flags=st.integers(0, 255),
    direction=st.integers(0, 1), tls=st.booleans(), role_hint=st.integers(0, 2), fresh=st.booleans(),
    gap=st.booleans(), comm=st.just("x"), data=st.binary(max_size=64))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, max_size=40))
def test_arbitrary_records_never_raise(evs):
    tr = Http2Tracker()
    for e in evs:
        tr.feed(e)
    assert tr.stats["internal_error"] == 0
    for x in tr.take_exchanges():
        assert x.method or x.status


def test_mutated_real_records_never_raise(grpc_rec, nginx):
    """Real records with bytes flipped (Huffman garbage, bad integers,
    wrong indices in every place): counted, never an exception."""
    rnd = random.Random(3)
    base = walk(grpc_rec[0]) + walk(nginx["nghttp"][0], conn_id=2)
    for _ in range(30):
        tr = Http2Tracker()
        for e in base:
            if e.data and rnd.random() < 0.3:
                d = bytearray(e.data)
                d[rnd.randrange(len(d))] = rnd.randrange(256)
                e = e._replace(data=bytes(d))
            tr.feed(e)
        assert tr.stats["internal_error"] == 0
        tr.take_exchanges()
