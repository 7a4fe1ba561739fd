"""HTTP/2 and gRPC through the real kernel programs, against real peers on
loopback (tests/h2_peers.py): nginx over h2c and TLS driven by h2load and
curl, grpcio server and client, Node's http2 module. Every count is compared
with what the peers themselves counted."""
from __future__ import annotations

import collections
import socket
import struct
import subprocess
import textwrap
import time

import pytest
from conftest import AgentProcess, maps_held, needs_root, wait_until
from otlp_data import assert_values_in_buckets, attrs_of, last_point, latest_per_series, points

import h2_peers as hp

pytestmark = needs_root


@pytest.fixture(scope="module")
def receiver():
    from otlp_receiver import GrpcReceiver
    r = GrpcReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def agent(receiver, tmp_path_factory):
    d = tmp_path_factory.mktemp("agent")
    a = AgentProcess(d, {"interval": "1s", "lock_file": str(d / "lock"), "health": "127.0.0.1:0",
                         "exporters": {"otlp": {"endpoint": receiver.endpoint, "protocol": "grpc"}},
                         "probes": {"http": {"routes": ["/users/{id}"], "max_spans_per_second": 100000}}})
    a.wait_for_log("collecting every", timeout=60)
    yield a
    assert a.stop() == 0, a.stderr()
    assert "Traceback" not in a.stderr(), a.stderr()


def series(rx, name: str, **match) -> list:
    """(attrs, count) of the latest point of every series of name matching."""
    with rx.lock:
        reqs = list(rx.metrics)
    return [(a, dp.count) for _m, dp, a in latest_per_series(points(reqs, name, **match))]


def counted(rx, name: str, keys: tuple, **match) -> collections.Counter:
    out = collections.Counter()
    for a, n in series(rx, name, **match):
        out[tuple(a.get(k) for k in keys)] += n
    return out


def spans(rx, **match) -> list:
    want = {k.replace("__", "."): v for k, v in match.items()}
    with rx.lock:
        reqs = list(rx.traces)
    return [(s, a) for req in reqs for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans
            for a in (attrs_of(s.attributes),) if all(a.get(k) == v for k, v in want.items())]


def drops(rx) -> dict:
    with rx.lock:
        reqs = list(rx.metrics)
    out = {}
    for _m, dp, a in latest_per_series(points(reqs, "otelbpf.dropped", otelbpf__probe="http")):
        out[a["reason"]] = dp.as_int or dp.as_double
    return out


def settle(check, timeout: float = 20.0, why=lambda: ""):
    """Wait until check() holds (counts arrive within a collection or two)."""
    if not wait_until(check, timeout=timeout):
        print("settle failed:", why())
        raise AssertionError("did not settle")


# ---------------------------------------------------------------- nginx

def test_nginx_h2c_and_tls_counts_equal_the_access_log(agent, receiver, tmp_path):
    """h2load (multiplexed: 8 streams per connection) and curl --http2
    against nginx over cleartext h2c and over TLS: per method, route and
    status, the server series equal nginx's access log; the client series of
    h2load and curl equal what they were answered."""
    rx = receiver.rx
    paths = ["/", "/missing", "/boom", "/users/7", "/big"]
    with hp.nginx_h2(tmp_path / "ngx") as ngx:
        expect_clients = {}
        for kind in ("h2c", "h2"):
            port = ngx.h2c_port if kind == "h2c" else ngx.tls_port
            r = hp.h2load([ngx.url(kind, p) for p in paths], n=500, c=4, m=8)
            assert r.done == 500, r.output
            curl = collections.Counter(hp.curl_h2(ngx.url(kind, p), tls=kind == "h2") for p in paths)
            expect_clients[port] = curl
        truth = {port: ngx.counts(port) for port in expect_clients}
        for port, log in truth.items():
            want = collections.Counter()
            for (proto, method, path, status), n in log.items():
                assert proto == "HTTP/2.0"
                want[(method, "/users/{id}" if path.startswith("/users/") else path, status, "2")] += n
            keys = ("http.request.method", "http.route", "http.response.status_code", "network.protocol.version")
            settle(lambda: counted(rx, "http.server.request.duration", keys, server__port=port) == want)
            for a, _n in series(rx, "http.server.request.duration", server__port=port):
                assert a["process.executable.name"] == "nginx" and a["url.scheme"] == (
                    "https" if port == ngx.tls_port else "http"), a
            by_status = collections.Counter()
            for (_m, _r, status, _v), n in want.items():
                by_status[status] += n
            ckeys = ("process.executable.name", "http.response.status_code")
            got = counted(rx, "http.client.request.duration", ckeys, server__port=port)
            settle(lambda: sum(n for (exe, _s), n in counted(rx, "http.client.request.duration", ckeys,
                                                                server__port=port).items()) == sum(by_status.values()))
            got = counted(rx, "http.client.request.duration", ckeys, server__port=port)
            curl = expect_clients[port]
            assert {s: n for (exe, s), n in got.items() if exe == "curl"} == dict(curl), got
            h2load = collections.Counter({s: n for (exe, s), n in got.items() if exe == "h2load"})
            assert h2load + curl == by_status, (got, by_status)
    assert not drops(rx).get("h2_hpack_error") and not drops(rx).get("h2_ringbuf_full"), drops(rx)


def test_traceparent_makes_the_h2_server_span_a_child(agent, receiver, tmp_path):
    """A request over HTTP/2 carrying a W3C traceparent: nginx's SERVER span
    joins that trace under that parent, over h2c and TLS."""
    rx = receiver.rx
    with hp.nginx_h2(tmp_path / "ngx") as ngx:
        sent = {}
        for kind in ("h2c", "h2"):
            tp = hp.random_traceparent()
            assert hp.curl_h2(ngx.url(kind, "/users/42"), tls=kind == "h2", traceparent=tp) == 200
            sent[ngx.h2c_port if kind == "h2c" else ngx.tls_port] = tp
        for port, tp in sent.items():
            _v, trace, parent, _f = tp.split("-")
            settle(lambda: spans(rx, server__port=port, http__route="/users/{id}"))
            (s, a), = [x for x in spans(rx, server__port=port, http__route="/users/{id}")
                       if x[0].kind == 2]
            assert s.trace_id.hex() == trace and s.parent_span_id.hex() == parent, (s, tp)
            assert s.name == "GET /users/{id}" and a["network.protocol.version"] == "2", a
            assert a["url.path"] == "/users/42" and a["http.response.status_code"] == 200, a


# ---------------------------------------------------------------- gRPC

GRPC_PLAN = {"unary": 12, "fail": 4, "slow": 3, "stream": 5}


def test_grpc_calls_per_method_and_status_equal_the_server_and_client(agent, receiver, tmp_path):
    """grpcio server and client over h2c: unary OK, an error the server
    returns (NOT_FOUND), a deadline exceeded and server streaming. Calls per
    method and status equal the server's own counts (SERVER side) and the
    client's results (CLIENT side); SERVER spans carry the caller's
    traceparent; error.type follows the conventions' per-side rules."""
    rx = receiver.rx
    with hp.grpc_server(tmp_path / "grpc") as srv:
        res = hp.grpc_client(srv.target, traceparent="random", parallel=3, **GRPC_PLAN)
        server = srv.counts()
    client = hp.grpc_call_counts(res)
    assert server == client, (server, client)
    want = collections.Counter({(m.lstrip("/"), code): n for (m, code), n in server.items()})
    keys = ("rpc.method", "rpc.status_code")
    settle(lambda: counted(rx, "rpc.server.call.duration", keys, rpc__system__name="grpc") >= want)
    settle(lambda: counted(rx, "rpc.client.call.duration", keys, server__port=srv.port) == want)
    mine = [(a, n) for a, n in series(rx, "rpc.server.call.duration") if a["rpc.method"].startswith("demo.Echo/")]
    assert collections.Counter({(a["rpc.method"], a["rpc.status_code"]): n for a, n in mine}) == want, mine
    for a, _n in mine:
        # a server's own failures only: NOT_FOUND is the caller's problem
        assert a.get("error.type") == ("DEADLINE_EXCEEDED" if a["rpc.status_code"] == "DEADLINE_EXCEEDED"
                                       else None), a
    for a, _n in series(rx, "rpc.client.call.duration", server__port=srv.port):
        assert a.get("error.type") == (None if a["rpc.status_code"] == "OK" else a["rpc.status_code"]), a
    # every call carried a traceparent: each SERVER span is its child
    sent = {c["traceparent"].split("-")[1]: c for c in res["calls"]}
    settle(lambda: len([s for s, a in spans(rx, rpc__system__name="grpc") if s.kind == 2
                        and s.trace_id.hex() in sent]) == len(sent))
    for s, a in spans(rx, rpc__system__name="grpc"):
        if s.kind == 2 and s.trace_id.hex() in sent:
            call = sent[s.trace_id.hex()]
            assert s.parent_span_id.hex() == call["traceparent"].split("-")[2], (s, call)
            assert s.name == call["method"].lstrip("/") == a["rpc.method"], (s.name, call)
            assert a["rpc.status_code"] == call["code"], (a, call)


CONNECTED_FIRST = textwrap.dedent("""
    import sys, grpc
    ch = grpc.insecure_channel(sys.argv[1])
    call = ch.unary_unary("/demo.Echo/Unary", request_serializer=None, response_deserializer=None)
    call(b"first", timeout=10)
    print("connected", flush=True)
    sys.stdin.readline()               # the agent starts now
    for i in range(int(sys.argv[2])):
        call(b"later", timeout=10)
    print("done", flush=True)
""")


def test_a_connection_opened_before_the_agent_is_counted_partial(receiver, tmp_path):
    """A gRPC channel connected (and its header tables filled) before the
    agent starts: its later calls are counted, on both sides, with what could
    be decoded, and marked otelbpf.partial; nothing is attributed to a wrong
    method."""
    from otlp_receiver import GrpcReceiver
    recv = GrpcReceiver()
    later = 7
    a = None
    with hp.grpc_server(tmp_path / "grpc") as srv:
        cli = subprocess.Popen([hp.PEER_PYTHON, "-c", CONNECTED_FIRST, srv.target, str(later)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert cli.stdout.readline().strip() == "connected"
            a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "",
                                        "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": "grpc"}},
                                        "probes": {"http": {"tls": False, "per_pid": True}}})
            a.wait_for_log("collecting every", timeout=60)
            cli.stdin.write("go\n")
            cli.stdin.flush()
            assert cli.stdout.readline().strip() == "done"
            server = srv.counts()
            assert server[("/demo.Echo/Unary", "OK")] == later + 1
            rx = recv.rx

            def joined(name, **m):
                return [(x, n) for x, n in series(rx, name, **m) if x.get("otelbpf.partial")]
            # (other tests' agents export over gRPC too: their connections are older than this agent)
            settle(lambda: sum(n for _x, n in joined("rpc.server.call.duration", process__pid=srv.pid)) == later
                   and sum(n for _x, n in joined("rpc.client.call.duration", server__port=srv.port)) == later,
                   why=lambda: (series(rx, "rpc.server.call.duration"), series(rx, "rpc.client.call.duration"),
                                drops(rx), a.stderr()))
            for x, _n in (joined("rpc.server.call.duration", process__pid=srv.pid)
                          + joined("rpc.client.call.duration", server__port=srv.port)):
                # what was decodable, nothing made up: the method's path and the
                # status sit in header tables filled before the agent came
                assert x["rpc.method"] in ("demo.Echo/Unary", "_OTHER") and x.get("rpc.status_code") in (
                    "OK", None) and "error.type" not in x, x
            partial = [dp.as_int for _m, dp, _a in latest_per_series(points(list(rx.metrics),
                                                                             "otelbpf.http.partial"))]
            assert partial and max(partial) >= 2 * later, partial   # (and the older connections')
            assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
        finally:
            cli.kill()
            if a is not None:
                a.kill()
            recv.stop()


def test_http2_off_traces_http1_only_and_allocates_no_http2_state(tmp_path):
    """probes.http.http2: false: nginx's HTTP/1 port is counted as its access
    log says, its h2c port not at all, and the HTTP/2 hash maps (allocated
    whole when loaded: 1.4 KB a connection in h2_conns) are cut to 64
    entries."""
    from otlp_receiver import GrpcReceiver
    recv = GrpcReceiver()
    a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "",
                                "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": "grpc"}},
                                "probes": {"http": {"tls": False, "http2": False}}})
    try:
        a.wait_for_log("collecting every", timeout=60)
        names = ("h2_conns", "h2_streams", "h2_known", "h2_hist")
        assert {m["name"]: m["max_entries"] for m in maps_held(a.pid) if m.get("name") in names} == \
            {n: 64 for n in names}
        with hp.nginx_h2(tmp_path / "ngx") as ngx:
            for _ in range(3):
                assert hp.curl_h2(ngx.url("h2c", "/"), tls=False) == 200
                out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*",
                                      ngx.url("h1", "/missing")], capture_output=True, text=True, timeout=15)
                assert out.stdout == "404"
            log = ngx.counts(ngx.h1_port, expect=3)
            assert log == {("HTTP/1.1", "GET", "/missing", 404): 3}, log
            keys = ("http.request.method", "http.response.status_code")
            settle(lambda: counted(recv.rx, "http.server.request.duration", keys, server__port=ngx.h1_port)
                   == {("GET", 404): 3},
                   why=lambda: (series(recv.rx, "http.server.request.duration"), a.stderr()))
            assert ngx.counts(ngx.h2c_port, expect=3)
            assert not series(recv.rx, "http.server.request.duration", server__port=ngx.h2c_port)
            assert not series(recv.rx, "http.client.request.duration", server__port=ngx.h2c_port)
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        a.kill()
        recv.stop()


# ---------------------------------------------------------------- Node

def test_node_http2_server_and_client(agent, receiver, tmp_path):
    """Node's http2 module (its own nghttp2) on both sides over h2c, streams
    multiplexed on one session: server and client series per path and status
    equal the Node server's counts and the Node client's results; a 100 ms
    route lands in the bucket that holds its duration."""
    rx = receiver.rx
    paths = ["/", "/missing", "/boom", "/big", "/slow"]
    with hp.node_h2_server(tmp_path / "node", tls=False) as srv:
        res = hp.node_h2_client(srv.url("h2c", ""), paths=paths, n=6, concurrency=4)
        server = srv.counts()
    client = hp.node_call_counts(res)
    assert sum(server.values()) == sum(client.values()) == 30, (server, client)
    want = collections.Counter({(m, p, s): n for (m, p, s), n in server.items()})
    keys = ("http.request.method", "http.route", "http.response.status_code")
    settle(lambda: counted(rx, "http.server.request.duration", keys, server__port=srv.h2c_port) == want,
           why=lambda: (counted(rx, "http.server.request.duration", keys, server__port=srv.h2c_port), want,
                        drops(rx)))
    ckeys = ("http.request.method", "http.response.status_code")
    cwant = collections.Counter()
    for (m, _p, s), n in client.items():
        cwant[(m, s)] += n
    settle(lambda: counted(rx, "http.client.request.duration", ckeys, server__port=srv.h2c_port,
                           process__executable__name="node") == cwant,
           why=lambda: (counted(rx, "http.client.request.duration", ckeys, server__port=srv.h2c_port,
                                process__executable__name="node"), cwant))
    with rx.lock:
        reqs = list(rx.metrics)
    for name in ("http.server.request.duration", "http.client.request.duration"):
        m, dp, _a = last_point(reqs, name, server__port=srv.h2c_port, http__route="/slow") if "server" in name \
            else (None, None, None)
        if m is not None:
            # 6 requests of >= 100 ms (the server's timer) and well under 1 s
            assert_values_in_buckets(m, dp, 0.1, 1.0, 6)


# ---------------------------------------------------------------- bad input

def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _send(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.settimeout(2)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def test_malformed_http2_no_false_requests_and_counted(agent, receiver, tmp_path):
    """Bytes no HTTP/2 peer should send, to nginx's h2c port: HPACK garbage,
    a header list far past what the kernel sends (a HPACK bomb), an index
    beyond every table, a truncated frame, a flood of streams reset at once,
    and a client that never sends the preface. No request is counted that
    nginx did not log, the agent keeps running, the losses are counted."""
    rx = receiver.rx
    settings = _frame(4, 0, 0, b"")
    with hp.nginx_h2(tmp_path / "ngx") as ngx:
        port = ngx.h2c_port
        _send(port, PREFACE + settings + _frame(1, 0x5, 1, b"\xff\xff\xff\xff\xff\xff\xff\x7f" * 8))
        _send(port, PREFACE + settings + _frame(1, 0x5, 1, b"\x82\x86\x84" + b"\x40\x01a\x7f\x7f" + b"x" * 20000))
        _send(port, PREFACE + settings + _frame(1, 0x5, 1, b"\xbf\xff\x7f"))
        _send(port, PREFACE + settings + _frame(1, 0x5, 1, b"\x82\x86")[:-1])
        # 300 streams at once, each adding an :authority to the header table
        flood = b"".join(_frame(1, 0x5, 2 * i + 1, b"\x82\x86\x84\x41\x03a.b") for i in range(300))
        _send(port, PREFACE + settings + flood)
        _send(port, b"\x00" * 64 + b"garbage that is not a preface\r\n")
        assert hp.curl_h2(ngx.url("h2c", "/"), tls=False) == 200    # and a real one after all that
        ngx.counts(port)          # the log is complete
        # what nginx answered (it also logs, with status 0, what it refused unanswered)
        want = collections.Counter((ln.method, ln.path, ln.status) for ln in ngx.lines(port)
                                   if ln.bytes_sent > 0 and ln.status)
    keys = ("http.request.method", "http.route", "http.response.status_code")
    settle(lambda: counted(rx, "http.server.request.duration", keys, server__port=port) == want,
           why=lambda: (counted(rx, "http.server.request.duration", keys, server__port=port), want, drops(rx)))
    time.sleep(2.5)   # two more collections: nothing else shows up
    assert counted(rx, "http.server.request.duration", keys, server__port=port) == want
    d = drops(rx)
    assert d.get("h2_block_cut", 0) + d.get("h2_truncated_block", 0) >= 1, d
    assert d.get("h2_hpack_error", 0) >= 1, d
    assert agent.proc.poll() is None, agent.stderr()


# ---------------------------------------------------------------- durations

def test_known_durations_land_in_their_buckets(tmp_path):
    """HTTP/2 requests and gRPC calls of known duration, server and client
    side, in every form they leave the agent (OTLP exponential, the file
    exporter's explicit buckets, the Prometheus endpoint's le buckets, the
    console's p50/p99): each lands in a bucket whose range holds its true
    duration, and the sums agree. Node's /slow answers after 100 ms; a gRPC
    call past its 0.3 s deadline ends at the deadline."""
    import socket as _socket
    import urllib.request

    from otlp_data import console_rows, parse_console_duration, populated_ranges, read_jsonl
    from otlp_receiver import GrpcReceiver
    from prometheus_client.parser import text_string_to_metric_families
    recv = GrpcReceiver()
    jsonl = tmp_path / "t.jsonl"
    with _socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        prom_port = sock.getsockname()[1]
    a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "",
                                "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": "grpc",
                                                       "histogram": "exponential"},
                                              "file": {"path": str(jsonl), "histogram": "explicit"},
                                              "prometheus": {"listen": f"127.0.0.1:{prom_port}"},
                                              "console": {"top": 100, "clear": False}},
                                "probes": {"http": {"tls": False, "spans": False, "per_pid": True}}})
    try:
        a.wait_for_log("collecting every", timeout=60)
        with hp.node_h2_server(tmp_path / "node", tls=False) as node:
            t0 = time.monotonic()
            res = hp.node_h2_client(node.url("h2c", ""), paths=["/slow"], n=4)
            node_wall = time.monotonic() - t0
            assert [c["status"] for c in res["calls"]] == [200] * 4, res
        with hp.grpc_server(tmp_path / "grpc") as srv:
            t0 = time.monotonic()
            g = hp.grpc_client(srv.target, slow=3, deadline=0.3)
            grpc_wall = time.monotonic() - t0
            assert [c["code"] for c in g["calls"]] == ["DEADLINE_EXCEEDED"] * 3, g
            grpc_pid = srv.pid
        checks = [  # (name, match, n, lo s, hi s)
            ("http.server.request.duration", {"server__port": node.h2c_port, "http__route": "/slow"}, 4, 0.1,
             node_wall),
            ("http.client.request.duration", {"server__port": node.h2c_port, "process__pid": res["pid"]}, 4, 0.1,
             node_wall),
            ("rpc.server.call.duration", {"process__pid": grpc_pid, "rpc__method": "demo.Echo/Slow"}, 3, 0.25,
             grpc_wall),
            ("rpc.client.call.duration", {"server__port": srv.port, "rpc__method": "demo.Echo/Slow"}, 3, 0.3,
             grpc_wall),
        ]

        def exported():
            with recv.rx.lock:
                reqs = list(recv.rx.metrics)
            return all(points(reqs, name, **m) and sum(dp.count for _m, dp, _a in latest_per_series(
                points(reqs, name, **m))) == n for name, m, n, _lo, _hi in checks)
        assert wait_until(exported, timeout=30), [(name, series(recv.rx, name)) for name, *_ in checks]
        time.sleep(1.5)     # one more file export and console render
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/metrics", timeout=5) as r:
            scraped = [smp for fam in text_string_to_metric_families(r.read().decode()) for smp in fam.samples]
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        a.kill()
        recv.stop()
    with recv.rx.lock:
        over_wire = list(recv.rx.metrics)
    for reqs, form in ((over_wire, "exponential_histogram"), (read_jsonl(jsonl), "histogram")):
        for name, m, n, lo, hi in checks:
            metric, dp, _attrs = last_point(reqs, name, **m)
            assert metric.unit == "s" and metric.WhichOneof("data") == form, (name, metric.unit, form)
            assert_values_in_buckets(metric, dp, lo, hi, n)
    console = a.stdout()
    for name, m, n, lo, hi in checks:
        # Prometheus: <name>_seconds_bucket, cumulative; the first le holding all n is the bucket
        labels = {k.replace("__", "_"): str(v) for k, v in m.items()}
        les = sorted((smp.labels["le"] if isinstance(smp.labels["le"], float) else float(smp.labels["le"]),
                      smp.value) for smp in scraped
                     if smp.name == name.replace(".", "_") + "_seconds_bucket"
                     and all(smp.labels.get(k) == v for k, v in labels.items()))
        assert les and les[-1][1] == n, (name, les)
        first = next(i for i, (_le, v) in enumerate(les) if v >= n)
        upper, lower = les[first][0], (les[first - 1][0] if first else 0.0)
        assert upper >= lo and lower < hi, f"{name}: true [{lo}, {hi}] s, le bucket ({lower}, {upper}]"
        # the console: p50 and p99 are the populated exponential bucket's upper edge
        metric, dp, _attrs = last_point(over_wire, name, **m)
        b_hi = max(r[1] for r in populated_ranges(metric, dp))
        # (process.pid is a resource attribute there, not in the row's label)
        key = " ".join(f"{k.replace('__', '.')}={v}" for k, v in m.items() if k != "process__pid")
        mine = [r for r in console_rows(console, name) if all(f"{part} " in r[3] + " " for part in key.split())]
        assert mine and mine[-1][0] == n, (name, key, console_rows(console, name))
        for q in mine[-1][1:3]:
            v, tol = parse_console_duration(q)
            assert abs(v - b_hi) <= tol and b_hi >= lo, f"{name}: console {q}, bucket upper edge {b_hi}"
