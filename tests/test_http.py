"""The http probe against real servers and clients on loopback: nginx
(Debian's, plain and TLS, driven by wrk and curl), a keep-alive Python server
sending chunked and delayed bodies, and non-HTTP streams. Ground truth is
what the servers themselves logged: nginx's access log (with $request_time)
and the Python server's own request log.

One agent runs for the whole module (gRPC export every second); each test
owns its server port, so its series and spans are told apart by server.port.
"""
from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import AgentProcess, curl, maps_held, needs_root, wait_until
from otlp_data import attrs_of, check_histograms, metrics

pytestmark = [needs_root, pytest.mark.skipif(not shutil.which("nginx") or not shutil.which("wrk"),
                                             reason="needs nginx and wrk (make setup installs them)")]

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORTS = {name: free_port() for name in ("count", "spans", "traceparent", "tls", "malformed", "ids")}

NGINX_CONF = """
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format t '$server_port $request_method $request_uri $status $request_time $bytes_sent "$http_traceparent"';
  access_log {d}/access.log t;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  sendfile on;
  server {{
    {listen}
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location = / {{ return 200 "hello\\n"; }}
    location = /missing {{ return 404; }}
    location = /old {{ return 301 /; }}
    location = /boom {{ return 500; }}
    location /users/ {{ return 200 "user\\n"; }}
    location /static/ {{ alias {d}/static/; }}
  }}
}}
"""


class Nginx:
    def __init__(self, d: Path):
        self.d = d
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                        "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=localhost"],
                       check=True, capture_output=True)
        (d / "static").mkdir()
        (d / "static" / "big.bin").write_bytes(os.urandom(512 * 1024))
        listen = " ".join(f"listen 127.0.0.1:{p}{' ssl' if name == 'tls' else ''};" for name, p in PORTS.items())
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, listen=listen))
        subprocess.run(["nginx", "-c", str(d / "nginx.conf")], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", PORTS["count"]), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    def log_lines(self, port: int) -> list:
        """(method, uri, status, request_time s, traceparent) per access-log
        line for port, of the requests nginx answered: it also logs a 400 for
        a client that hung up mid-request (0 bytes sent: nothing to time),
        and for bytes that were no HTTP request at all (method "-")."""
        out = []
        path = self.d / "access.log"
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            parts = line.split(" ", 6)
            if len(parts) == 7 and parts[0] == str(port) and parts[1] != "-" and int(parts[5]) > 0:
                out.append((parts[1], parts[2], int(parts[3]), float(parts[4]), parts[6].strip('"')))
        return out

    def stop(self) -> None:
        subprocess.run(["nginx", "-c", str(self.d / "nginx.conf"), "-s", "stop"], capture_output=True)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    n = Nginx(tmp_path_factory.mktemp("nginx"))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def receiver():
    from otlp_receiver import GrpcReceiver
    r = GrpcReceiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def rx(receiver):
    return receiver.rx


@pytest.fixture(scope="module")
def agent(receiver, tmp_path_factory, nginx):
    d = tmp_path_factory.mktemp("agent")
    a = AgentProcess(d, {"interval": "1s", "lock_file": str(d / "lock"), "health": "127.0.0.1:0",
                         "exporters": {"otlp": {"endpoint": receiver.endpoint, "protocol": "grpc",
                                                "histogram": "explicit"}},
                         "probes": {"http": {"routes": ["/users/{id}"]}}})
    a.wait_for_log("collecting every", timeout=60)
    yield a
    assert a.stop() == 0, a.stderr()
    assert "Traceback" not in a.stderr(), a.stderr()


# ---------------------------------------------------------------- readers

def server_counts(rx, port: int, name: str = "http.server.request.duration") -> collections.Counter:
    """Latest cumulative count per (method, status) over the series of port."""
    latest: dict = {}
    with rx.lock:
        reqs = list(rx.metrics)
    for _res, _scope, m in metrics(reqs, name):
        for dp in m.histogram.data_points:
            a = attrs_of(dp.attributes)
            if a.get("server.port") != port:
                continue
            key = tuple(sorted(a.items()))
            if key not in latest or dp.time_unix_nano >= latest[key][0]:
                latest[key] = (dp.time_unix_nano, dp.count, a)
    out = collections.Counter()
    for _t, count, a in latest.values():
        out[(a["http.request.method"], a["http.response.status_code"])] += count
    return out


def spans(rx, **match) -> list:
    """(span, attrs, resource attrs) of every span whose attributes include match."""
    want = {k.replace("__", "."): v for k, v in match.items()}
    out = []
    with rx.lock:
        reqs = list(rx.traces)
    for req in reqs:
        for rs in req.resource_spans:
            res = attrs_of(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    a = attrs_of(s.attributes)
                    if all(a.get(k) == v for k, v in want.items()):
                        out.append((s, a, res))
    return out


def http_drops(rx, probe: str = "http") -> dict:
    """A probe's (or exporter.otlp's) otelbpf.dropped counters, latest values, non-zero."""
    out = {}
    with rx.lock:
        reqs = list(rx.metrics)
    for _r, _s, m in metrics(reqs, "otelbpf.dropped"):
        for dp in m.sum.data_points:
            a = attrs_of(dp.attributes)
            if a.get("otelbpf.probe") == probe and dp.as_int:
                out[a["reason"]] = max(out.get(a["reason"], 0), dp.as_int)
    return out


def why_no_span(rx, agent, port) -> str:
    """What to look at when an expected span is missing."""
    tail = "".join(agent.stderr().splitlines(keepends=True)[-15:])
    return (f"counted on port {port}: {dict(server_counts(rx, port))}; http drops {http_drops(rx)}; "
            f"export drops {http_drops(rx, 'exporter.otlp')}; agent log tail:\n{tail}")


def log_counts(lines) -> collections.Counter:
    return collections.Counter((m, s) for m, _u, s, _t, _tp in lines)


def wrk(url: str, seconds: int = 2, conns: int = 8) -> None:
    subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", url], check=True, capture_output=True, timeout=60)


def assert_counts_match_log(rx, nginx, port):
    # the log is read again while waiting: nginx writes a request's line just
    # after its response, which the client (and the agent) may see first
    got = wait_until(lambda: (c := server_counts(rx, port)) == log_counts(nginx.log_lines(port)) and c) \
        or server_counts(rx, port)
    expected = log_counts(nginx.log_lines(port))
    assert sum(expected.values()) > 0
    assert got == expected, f"exported {dict(got)} vs access log {dict(expected)}; probe drops {http_drops(rx)}"
    assert check_histograms(list(rx.metrics)) > 0


# ------------------------------------------------------------------ tests

def test_server_spans_match_access_log_one_to_one(agent, rx, nginx):
    port = PORTS["spans"]
    base = f"http://127.0.0.1:{port}"
    for path in ("/", "/missing", "/old", "/boom", "/users/7", "/static/big.bin", "/users/8?token=secret"):
        curl(f"{base}{path}")
    curl("-I", f"{base}/")
    curl("-X", "DELETE", f"{base}/users/9")
    lines = nginx.log_lines(port)
    assert len(lines) == 9
    def server_spans():
        return [(s, a) for s, a, _r in spans(rx, server__port=port) if s.kind == s.SPAN_KIND_SERVER]
    wait_until(lambda: len(server_spans()) >= 9)
    server = server_spans()
    assert sorted((a["http.request.method"], a["url.path"], a["http.response.status_code"]) for _s, a in server) == \
        sorted((m, u.split("?")[0], st) for m, u, st, _t, _tp in lines)
    by_key = {(a["http.request.method"], a["url.path"], a["http.response.status_code"]): s for s, a in server}
    for m, u, st, rt, _tp in lines:
        s = by_key[(m, u.split("?")[0], st)]
        dur = (s.end_time_unix_nano - s.start_time_unix_nano) / 1e9
        assert abs(dur - rt) <= max(0.002, 0.1 * rt), f"{m} {u}: span {dur:.4f}s vs nginx {rt:.3f}s"
    for s, a in server:
        assert a["network.peer.address"] == "127.0.0.1" and a["user_agent.original"].startswith("curl/")
        assert "url.query" not in a and "secret" not in json.dumps(a)   # query strings stay in the kernel
        assert s.name == f"{a['http.request.method']} {a['http.route']}"
    assert any(s.status.code == s.status.STATUS_CODE_ERROR for s, a in server if a["http.response.status_code"] == 500)
    res = next(r for _s, _a, r in spans(rx, server__port=port))
    assert res["service.name"] == "nginx" and res["process.executable.name"] == "nginx"


def test_client_spans_from_curl(agent, rx, nginx):
    port = PORTS["spans"]
    url = f"http://127.0.0.1:{port}/missing"
    curl(url)
    got = wait_until(lambda: [x for x in spans(rx, url__full=url) if x[0].kind == x[0].SPAN_KIND_CLIENT])
    assert got, "no CLIENT span for curl"
    s, a, res = got[-1]
    assert a["http.response.status_code"] == 404 and a["server.port"] == port and a["server.address"] == "127.0.0.1"
    assert res["process.executable.name"] == "curl" and s.name == "GET"
    counts = wait_until(lambda: server_counts(rx, port, "http.client.request.duration"))
    assert counts[("GET", 404)] >= 1


def test_traceparent_makes_the_server_span_a_child(agent, rx, nginx):
    port = PORTS["traceparent"]
    base = f"http://127.0.0.1:{port}"
    curl("-H", f"traceparent: {TRACEPARENT}", f"{base}/users/1")
    unsampled = "00-11111111111111111111111111111111-2222222222222222-00"
    curl("-H", f"traceparent: {unsampled}", f"{base}/users/2")
    got = wait_until(lambda: spans(rx, server__port=port, url__path="/users/1"))
    assert got
    s = got[0][0]
    assert s.trace_id.hex() == TRACEPARENT.split("-")[1]
    assert s.parent_span_id.hex() == TRACEPARENT.split("-")[2]
    assert s.span_id.hex() != TRACEPARENT.split("-")[2]
    # the caller said "not sampled": no span, but the request still counts
    assert wait_until(lambda: server_counts(rx, port)[("GET", 200)] == 2)
    assert not spans(rx, server__port=port, url__path="/users/2")


PY_SERVER = textwrap.dedent("""
    import signal, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # keep-alive
        def log_message(self, fmt, *args):
            pass
        def log_request(self, code="-", size="-"):
            print(self.command, self.path, int(code), flush=True)
        def body(self, data):
            if self.command != "HEAD":
                self.wfile.write(data)
                self.wfile.flush()
        def do_GET(self):
            if self.path == "/chunked":        # three chunks, 40 ms apart
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                for i in range(3):
                    time.sleep(0.04)
                    part = b"part%d" % i
                    self.body(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                self.body(b"0\\r\\n\\r\\n")
            elif self.path == "/slow":         # headers now, the body 60 ms later
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.flush()
                time.sleep(0.06)
                self.body(b"done")
            elif self.path == "/empty":
                self.send_response(204)
                self.end_headers()
            else:
                data = b"x" * 3000
                self.send_response(404 if self.path == "/nope" else 200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.body(data)
        do_HEAD = do_GET
        def do_POST(self):                     # http.server answers Expect: 100-continue itself
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(201)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.body(body)

    # the test stops it with SIGINT, which a shell's background job inherits as ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    print("ready", flush=True)
    srv.serve_forever()
""")

PY_CLIENT = textwrap.dedent("""
    import http.client, sys
    c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))   # one keep-alive connection
    for path in sys.argv[2:]:
        method = "HEAD" if path == "HEAD" else "GET"
        c.request(method, "/" if path == "HEAD" else path)
        r = c.getresponse()
        r.read()
        print(method, path, r.status, flush=True)
""")


def test_python_server_keepalive_chunked_and_slow_bodies(agent, rx, tmp_path):
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", PY_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        paths = ["/a", "/chunked", "/slow", "/empty", "/nope", "HEAD", "/a", "/chunked"] * 3
        out = subprocess.run([sys.executable, "-c", PY_CLIENT, str(port), *paths], capture_output=True, text=True,
                             check=True, timeout=60).stdout.splitlines()
        assert len(out) == len(paths)
        time.sleep(0.3)
    finally:
        srv.send_signal(signal.SIGINT)
        logged, _ = srv.communicate(timeout=10)
    expected = collections.Counter((m, int(s)) for m, _p, s in (line.split() for line in logged.splitlines()))
    assert sum(expected.values()) == len(paths)
    got = wait_until(lambda: (c := server_counts(rx, port)) == expected and c) or server_counts(rx, port)
    assert got == expected
    # the client side sees the same requests on its connection
    client = wait_until(lambda: (c := server_counts(rx, port, "http.client.request.duration")) == expected and c)
    assert client == expected
    # end = last byte: the chunked body took 3 x 40 ms, the slow body 60 ms after its headers
    server = [(s, a) for s, a, _r in spans(rx, server__port=port) if s.kind == s.SPAN_KIND_SERVER]
    dur = collections.defaultdict(list)
    for s, a in server:
        dur[a["url.path"]].append((s.end_time_unix_nano - s.start_time_unix_nano) / 1e9)
    assert len(dur["/chunked"]) == 6 and min(dur["/chunked"]) >= 0.12, dur["/chunked"]
    assert len(dur["/slow"]) == 3 and min(dur["/slow"]) >= 0.06, dur["/slow"]
    assert max(dur["/a"]) < 0.05 and max(dur["/empty"]) < 0.05


def test_split_requests_and_100_continue(agent, rx, tmp_path):
    """A request whose headers arrive in pieces is one request, timed from
    its first byte; a POST that waits for 100 Continue is one request with
    its final status. (A request line itself split across reads is not
    recognised: the first read must hold it.)"""
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", PY_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", port)) as c:
            for piece in (b"GET /a HTTP/1.1\r\nHo", b"st: localhost\r\nUser-Agent: split\r\n", b"\r\n"):
                c.sendall(piece)
                time.sleep(0.05)
            assert c.recv(65536).startswith(b"HTTP/1.1 200")
        body = tmp_path / "body"
        body.write_bytes(b"y" * 5000)
        out = curl("-H", "Expect: 100-continue", "--data-binary", f"@{body}", f"http://127.0.0.1:{port}/upload")
        assert out.strip() == "201"
        time.sleep(0.3)
    finally:
        srv.send_signal(signal.SIGINT)
        logged, _ = srv.communicate(timeout=10)
    expected = collections.Counter((m, int(s)) for m, _p, s in (line.split() for line in logged.splitlines()))
    assert expected == {("GET", 200): 1, ("POST", 201): 1}
    assert wait_until(lambda: server_counts(rx, port) == expected), dict(server_counts(rx, port))
    split = wait_until(lambda: [x for x in spans(rx, server__port=port, url__path="/a")
                                if x[0].kind == x[0].SPAN_KIND_SERVER])
    assert split
    # timed from its first byte: 100 ms before the last
    s = split[0][0]
    assert (s.end_time_unix_nano - s.start_time_unix_nano) / 1e9 >= 0.095


def _stream(port: int, payloads: list, reply: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        for p in payloads:
            c.sendall(p)
            if reply:
                c.recv(65536)


NON_HTTP_SERVER = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
    print("ready", flush=True)
    def serve(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                # answers that look like HTTP responses and like Redis
                c.sendall(b"HTTP/1.1 200 OK\\r\\n\\r\\n" if d.startswith(b"GET /x") else b"+PONG\\r\\n")
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")


def test_non_http_streams_produce_no_http_data(agent, rx):
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", NON_HTTP_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        rnd = random.Random(7)
        _stream(port, [bytes(rnd.getrandbits(8) for _ in range(1500)) for _ in range(50)], reply=True)
        _stream(port, [b"*1\r\n$4\r\nPING\r\n"] * 200, reply=True)                 # Redis
        _stream(port, [b"GET /x\r\n\r\n"] * 20, reply=True)                        # HTTP/0.9-like, no version
        _stream(port, [b"GET /x HTTP/9.9\r\n\r\n"] * 20, reply=True)               # not HTTP/1.x
        _stream(port, [b"POSTMAN / HTTP/1.1\r\n\r\n"] * 20, reply=True)            # not a method
        time.sleep(3)
    finally:
        srv.kill()
        srv.wait()
    assert not server_counts(rx, port) and not server_counts(rx, port, "http.client.request.duration")
    assert not spans(rx, server__port=port) and not spans(rx, network__peer__port=port)


def _conn_entries(port: int) -> int:
    """http_conns entries of connections on port (bpftool's view of the kernel map)."""
    out = subprocess.run(["bpftool", "map", "dump", "name", "http_conns", "-j"], capture_output=True, text=True)
    entries = []
    for e in json.loads(out.stdout or "[]"):
        # bpftool prints {key, value} per entry, or per map {id, name, elements}
        # when the name matches several maps (another agent's, say)
        entries += e.get("elements", [e]) if "elements" in e else [e]
    n = 0
    for e in entries:
        v = bytes(int(x, 16) for x in e.get("value", []))
        if len(v) >= 36 and port in (int.from_bytes(v[32:34], "little"), int.from_bytes(v[34:36], "little")):
            n += 1
    return n


def _hist_entries(port: int) -> int:
    """http_hist keys of port (struct http_key: tgid u32, status u16, port u16...)."""
    out = subprocess.run(["bpftool", "map", "dump", "name", "http_hist", "-j"], capture_output=True, text=True)
    entries = []
    for e in json.loads(out.stdout or "[]"):
        entries += e.get("elements", [e]) if "elements" in e else [e]
    keys = [bytes(int(x, 16) for x in e.get("key", [])) for e in entries]
    return sum(1 for k in keys if len(k) >= 8 and int.from_bytes(k[6:8], "little") == port)


def test_paths_with_ids_leave_the_kernel_and_the_totals_stay_exact(agent, rx, nginx):
    """A REST API's paths carry ids: each one is a kernel histogram key of
    its own. Keys that stop changing are retired (their last counts read in
    the same step as the delete), so the map holds what is active, and the
    exported totals still equal nginx's log."""
    port = PORTS["ids"]
    base = f"http://127.0.0.1:{port}"
    curl(*[f"{base}/users/{i}" for i in range(300)])  # one keep-alive connection
    assert wait_until(lambda: server_counts(rx, port)[("GET", 200)] == 300)
    assert wait_until(lambda: _hist_entries(port) == 0, timeout=20), "idle keys were not retired"
    curl(*[f"{base}/users/{i}" for i in range(250, 400)])  # 50 paths come back, 100 are new
    assert_counts_match_log(rx, nginx, port)
    assert server_counts(rx, port)[("GET", 200)] == 450
    routes = {a.get("http.route") for _r, _s, m in metrics(list(rx.metrics), "http.server.request.duration")
              for dp in m.histogram.data_points for a in [attrs_of(dp.attributes)] if a.get("server.port") == port}
    assert routes == {"/users/{id}"}  # the module agent configures this pattern


def test_malformed_traffic_no_false_spans_and_state_reaped(agent, rx, nginx):
    port = PORTS["malformed"]
    noise = random.Random(3)
    socks = []
    try:
        for _ in range(20):   # truncated requests, left open, then closed
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /users/1 HTTP/1.1\r\nHost: lo")
            socks.append(s)
        for _ in range(5):    # slowloris: a byte at a time
            for s in socks[:5]:
                s.sendall(b"X")
            time.sleep(0.05)
        _stream(port, [bytes(noise.getrandbits(8) for _ in range(4096))], reply=False)   # binary noise
        big = b"GET /users/2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"    # giant header
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(big)
            s.recv(65536)
        assert _conn_entries(port) >= 20          # the open partial requests are tracked...
    finally:
        for s in socks:
            s.close()
    time.sleep(1.5)
    assert wait_until(lambda: _conn_entries(port) == 0, timeout=10), "state kept for closed connections"
    # only what nginx really answered is counted (the giant header got a 400)
    assert_counts_match_log(rx, nginx, port)
    assert agent.proc.poll() is None


# The wrk runs come last: at full speed they use up each second's span budget
# (max_spans_per_second), which would starve the span checks above.

def test_request_counts_equal_nginx_access_log(agent, rx, nginx):
    port = PORTS["count"]
    base = f"http://127.0.0.1:{port}"
    wrk(f"{base}/", seconds=2)
    wrk(f"{base}/users/42", seconds=1, conns=4)
    wrk(f"{base}/missing", seconds=1, conns=4)
    # curl with several URLs reuses one keep-alive connection
    curl(*([f"{base}/old"] * 15 + [f"{base}/boom"] * 10))
    curl("-X", "POST", "-d", "x=1", *([f"{base}/"] * 5))
    curl("-I", f"{base}/")
    assert_counts_match_log(rx, nginx, port)
    routes = {a.get("http.route") for _r, _s, m in metrics(list(rx.metrics), "http.server.request.duration")
              for dp in m.histogram.data_points for a in [attrs_of(dp.attributes)] if a.get("server.port") == port}
    assert routes == {"/", "/users/{id}", "/missing", "/old", "/boom"}   # configured route, learned ones
    # explicit form: the semantic conventions' bounds, in seconds
    m = next(m for _r, _s, m in metrics(list(rx.metrics), "http.server.request.duration"))
    assert m.unit == "s"
    assert list(m.histogram.data_points[0].explicit_bounds) == [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                                                                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]


def test_tls_counts_and_attributes_like_plain_http(agent, rx, nginx):
    port = PORTS["tls"]
    base = f"https://127.0.0.1:{port}"
    curl("-k", *([f"{base}/missing"] * 5 + [f"{base}/users/3"] * 5))
    curl("-k", "-H", f"traceparent: {TRACEPARENT}", f"{base}/boom")
    tls_spans = wait_until(lambda: spans(rx, server__port=port, url__path="/boom"))
    assert tls_spans, why_no_span(rx, agent, port)
    s, a, _res = tls_spans[0]
    assert a["url.scheme"] == "https" and a["http.response.status_code"] == 500
    assert s.trace_id.hex() == TRACEPARENT.split("-")[1]
    client = wait_until(lambda: spans(rx, url__full=f"{base}/missing"))
    assert client and client[0][1]["url.scheme"] == "https"
    # Python's ssl module goes through SSL_read_ex/SSL_write_ex
    py = f"{base}/users/4"
    subprocess.run([sys.executable, "-c", "import ssl, sys, urllib.request\n"
                    "urllib.request.urlopen(sys.argv[1], context=ssl._create_unverified_context()).read()", py],
                   check=True, timeout=30)
    got = wait_until(lambda: [x for x in spans(rx, url__full=py) if x[0].kind == x[0].SPAN_KIND_CLIENT])
    assert got and got[0][1]["http.response.status_code"] == 200 and got[0][1]["url.scheme"] == "https"
    wrk(f"{base}/", seconds=2, conns=4)
    assert_counts_match_log(rx, nginx, port)


def test_span_flood_is_bounded_and_counted_while_metrics_stay_exact(rx, nginx, tmp_path):
    """A tiny ring buffer and span queue, no rate cap: spans are lost and
    counted, every request is still in the metrics, the agent stays up.
    The load generator is excluded by name: its client side is not traced."""
    from otlp_receiver import GrpcReceiver
    flood_rx = GrpcReceiver()
    a = None
    try:
        a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
                                    "exporters": {"otlp": {"endpoint": flood_rx.endpoint, "protocol": "grpc",
                                                           "histogram": "explicit"}},
                                    "probes": {"http": {"ring_buffer_bytes": 4096, "span_queue": 100,
                                                        "max_spans_per_second": 10_000_000, "tls": False,
                                                        "exclude": ["wrk"]}}})
        a.wait_for_log("collecting every", timeout=60)
        port = PORTS["count"]
        before = log_counts(nginx.log_lines(port))
        wrk(f"http://127.0.0.1:{port}/users/5", seconds=2, conns=8)

        def expected():     # read again while waiting: nginx logs a request just after answering it
            return log_counts(nginx.log_lines(port)) - before

        def dropped():
            return http_drops(flood_rx.rx)
        assert wait_until(lambda: server_counts(flood_rx.rx, port) == expected()), \
            f"{dict(server_counts(flood_rx.rx, port))} vs {dict(expected())}"
        assert not server_counts(flood_rx.rx, port, "http.client.request.duration")   # wrk is excluded
        assert check_histograms(list(flood_rx.rx.metrics)) > 0
        lost = wait_until(lambda: (d := dropped()).get("ringbuf_full", 0) + d.get("span_queue_full", 0))
        assert lost > 0, dropped()
        assert dropped().get("rate_limited", 0) == 0
        assert a.proc.poll() is None
        assert a.stop() == 0 and "Traceback" not in a.stderr()
        assert "dropped (ringbuf_full)" in a.stderr() or "dropped (span_queue_full)" in a.stderr()
    finally:
        if a is not None:
            a.kill()
        flood_rx.stop()


def test_libssl_copies_in_use_are_found_and_probed(nginx, tmp_path):
    """A libssl the dynamic linker does not list (a container's own copy, a
    vendored one): found in a running process's maps, probed through
    /proc/PID/root, and a client using it gets its CLIENT spans."""
    from otlp_receiver import GrpcReceiver
    libdir = tmp_path / "vendored"
    libdir.mkdir()
    shutil.copy("/lib/x86_64-linux-gnu/libssl.so.3", libdir / "libssl.so.3")
    holder = subprocess.Popen([sys.executable, "-c", f"import ctypes, time\nctypes.CDLL('{libdir}/libssl.so.3')\n"
                               "print('mapped', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    recv = GrpcReceiver()
    a = None
    try:
        assert holder.stdout.readline().strip() == "mapped"
        a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
                                    "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": "grpc"}},
                                    "probes": {"http": {"tls_discovery": "1s"}}})
        a.wait_for_log("collecting every", timeout=60)
        a.wait_for_log(f"TLS: probing {libdir}/libssl.so.3", timeout=20)
        url = f"https://127.0.0.1:{PORTS['tls']}/users/77"
        env = dict(os.environ, LD_LIBRARY_PATH=str(libdir))
        assert subprocess.run(["curl", "-sk", "-o", "/dev/null", url], env=env, check=True).returncode == 0
        maps = subprocess.run(["sh", "-c", f"LD_LIBRARY_PATH={libdir} ldd $(command -v curl)"], capture_output=True,
                              text=True).stdout
        assert str(libdir) in maps          # curl really runs on the copy
        got = wait_until(lambda: [x for x in spans(recv.rx, url__full=url) if x[0].kind == x[0].SPAN_KIND_CLIENT])
        assert got and got[0][1]["url.scheme"] == "https" and got[0][2]["process.executable.name"] == "curl"
        assert a.stop() == 0 and "Traceback" not in a.stderr()
    finally:
        if a is not None:
            a.kill()
        holder.kill()
        recv.stop()


# ---------------------------------------------- known durations in buckets

TIMED_SERVER = textwrap.dedent("""
    import sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def handler(delay):
        class H(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass
            def do_GET(self):
                time.sleep(delay)              # the request has been read: the transaction takes longer
                self.send_response(200)
                self.send_header("Content-Length", "3")
                self.end_headers()
                self.wfile.write(b"ok\\n")
        return H

    for arg in sys.argv[1:]:                   # PORT=SECONDS: one server per duration
        port, delay = arg.split("=")
        srv = ThreadingHTTPServer(("127.0.0.1", int(port)), handler(float(delay)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

# Handler delays (s), from ~0 to beyond a second, each well inside one
# power-of-two bucket and one semantic-convention bucket.
DELAYS = (0.0, 0.0028, 0.012, 0.04, 0.18, 0.6, 1.3)


def _timed_requests(ports: dict) -> dict:
    """One curl request per port, all at once. Returns port -> (lo, hi) s:
    the server's delay (nothing is answered sooner) and curl's own
    time_total (the whole transfer, connect included), which bound both the
    server's and the client's duration of the transaction."""
    procs = {port: subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                                     f"http://127.0.0.1:{port}/timed"], stdout=subprocess.PIPE, text=True)
             for port in ports}
    out = {}
    for port, p in procs.items():
        status, total = p.communicate(timeout=30)[0].split()
        assert status == "200"
        out[port] = (ports[port], float(total))
        assert out[port][1] >= out[port][0]
    return out


@pytest.mark.parametrize("otlp_form,file_form,transport", [("exponential", "explicit", "grpc"),
                                                           ("explicit", "exponential", "http/protobuf")])
def test_known_durations_land_in_their_buckets(tmp_path, otlp_form, file_form, transport):
    """Requests of known duration through the real programs: every form the
    agent exports (OTLP over the wire, the file exporter, exponential and
    explicit, the console's quantiles) puts each one, server and client
    side, in the bucket whose range holds its true duration."""
    from otlp_data import (assert_values_in_buckets, check_histograms, console_rows, last_point,
                           parse_console_duration, points, populated_ranges, read_jsonl)
    from otlp_receiver import GrpcReceiver, HttpReceiver
    recv = GrpcReceiver() if transport == "grpc" else HttpReceiver()
    jsonl = tmp_path / "t.jsonl"
    ports = {free_port(): d for d in DELAYS}
    srv = subprocess.Popen([sys.executable, "-c", TIMED_SERVER, *(f"{p}={d}" for p, d in ports.items())],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    a = None
    try:
        assert srv.stdout.readline().strip() == "ready"
        a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
                                    "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": transport,
                                                           "histogram": otlp_form},
                                                  "file": {"path": str(jsonl), "histogram": file_form},
                                                  "console": {"top": 100, "clear": False}},
                                    "probes": {"http": {"tls": False, "spans": False}}})
        a.wait_for_log("collecting every", timeout=60)
        truth = _timed_requests(ports)

        def exported(port):
            return all(points(list(recv.rx.metrics), name, server__port=port)
                       for name in ("http.server.request.duration", "http.client.request.duration"))
        assert wait_until(lambda: all(exported(p) for p in ports)), a.stderr()
        time.sleep(1.2)   # one more export: the console shows what moved in its interval
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        if a is not None:
            a.kill()
        srv.kill()
        srv.wait()
        recv.stop()
    over_wire, from_file = list(recv.rx.metrics), read_jsonl(jsonl)
    console = a.stdout()
    for reqs, form in ((over_wire, otlp_form), (from_file, file_form)):
        assert check_histograms(reqs) > 0
        for port, (lo, hi) in truth.items():
            for name in ("http.server.request.duration", "http.client.request.duration"):
                m, dp, attrs = last_point(reqs, name, server__port=port)
                assert m.WhichOneof("data") == ("histogram" if form == "explicit" else "exponential_histogram")
                assert m.unit == "s"
                if form == "explicit":
                    assert list(dp.explicit_bounds) == [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                                                        1.0, 2.5, 5.0, 7.5, 10.0]
                else:
                    assert dp.scale == 0
                assert_values_in_buckets(m, dp, max(lo, 1e-9), hi, 1)
    # the console view: p50 and p99 of one request are its bucket's upper edge
    for name in ("http.server.request.duration", "http.client.request.duration"):
        rows = console_rows(console, name)
        for port, (lo, hi) in truth.items():
            mine = [r for r in rows if f"server.port={port} " in r[3] + " "]
            assert mine, f"no console row for {name} server.port={port}:\n{console}"
            m, dp, _ = last_point(from_file if file_form == "exponential" else over_wire, name, server__port=port)
            (_b_lo, b_hi, _c), = populated_ranges(m, dp)
            for total, p50, p99, label in mine:
                assert total == 1, label
                for q in (p50, p99):
                    v, tol = parse_console_duration(q)
                    # the bucket's upper edge, as printed (rounded: 62.5 ms shows as "62ms")
                    assert abs(v - b_hi) <= tol, f"{name} {label}: console {q}, bucket upper edge {b_hi}"
                    # a bucket (v/2, v] that can hold the truth (b_hi is exact, v is rounded)
                    assert b_hi / 2 < hi and b_hi >= lo, f"{name} {label}: console {q}, true [{lo}, {hi}] s"


def _own_conn_entries(port: int, pid: int) -> int:
    """http_conns entries of connections on port, in the map the agent
    `pid` holds (another agent's map may hold the same connections)."""
    maps = [m["id"] for m in maps_held(pid, "http_conns")]
    assert len(maps) == 1, f"agent {pid} holds {len(maps)} http_conns maps"
    out = subprocess.run(["bpftool", "map", "dump", "id", str(maps[0]), "-j"], capture_output=True, text=True,
                         check=True)
    n = 0
    for e in json.loads(out.stdout or "[]"):
        v = bytes(int(x, 16) for x in e.get("value", []))
        if len(v) >= 36 and port in (int.from_bytes(v[32:34], "little"), int.from_bytes(v[34:36], "little")):
            n += 1
    return n


def test_idle_connection_state_goes_after_connection_idle_seconds(tmp_path):
    """connection_idle is seconds, compared with the kernel's monotonic ns:
    an open connection that stopped mid-request keeps its state for that
    long, not less, and loses it at the next sweep after (every 6
    collections)."""
    idle, interval = 2.0, 0.2
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-c", PY_SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    a = None
    try:
        assert srv.stdout.readline().strip() == "ready"
        a = AgentProcess(tmp_path, {"interval": f"{interval}s", "lock_file": str(tmp_path / "lock"),
                                    "health": "127.0.0.1:0", "exporters": {"file": {"path": str(tmp_path / "t")}},
                                    "probes": {"http": {"tls": False, "spans": False,
                                                        "connection_idle": f"{idle}s"}}})
        a.wait_for_log("collecting every", timeout=60)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET /a HTTP/1.1\r\nHo")          # a request that never ends
            t0 = time.monotonic()
            seen = []
            while time.monotonic() - t0 < idle + 6 * interval + 2:
                n = _own_conn_entries(port, a.pid)
                seen.append((round(time.monotonic() - t0, 2), n))
                if not n:
                    break
                time.sleep(0.1)
            gone = next((t for t, n in seen if not n), None)
            assert seen[0][1] >= 1, seen
            assert gone is not None, f"state kept past connection_idle ({idle}s): {seen}"
            assert gone >= idle, f"state dropped after {gone}s of idleness, connection_idle is {idle}s: {seen}"
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        if a is not None:
            a.kill()
        srv.kill()
        srv.wait()


def test_span_cap_is_per_second(tmp_path, nginx):
    """max_spans_per_second counts spans in one-second windows of the
    kernel's ns clock: two bursts of 30 requests (60 spans each, server and
    client side) 1.2 s apart get 5 spans per window they touch, 10 to 20 in
    all, the rest counted as rate_limited (ms windows would pass nearly all
    120, 1000 s windows only 5)."""
    from otlp_receiver import GrpcReceiver
    recv = GrpcReceiver()
    port = PORTS["ids"]
    a = None
    try:
        a = AgentProcess(tmp_path, {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
                                    "exporters": {"otlp": {"endpoint": recv.endpoint, "protocol": "grpc"}},
                                    "probes": {"http": {"tls": False, "max_spans_per_second": 5}}})
        a.wait_for_log("collecting every", timeout=60)
        url = f"http://127.0.0.1:{port}/"
        for burst in range(2):
            t = time.monotonic()
            curl(*[url] * 30)              # one keep-alive connection
            assert time.monotonic() - t < 1.0, "a burst took a second: it would span several windows"
            if not burst:
                time.sleep(1.2)
        assert wait_until(lambda: http_drops(recv.rx).get("rate_limited", 0) > 0), http_drops(recv.rx)
        time.sleep(1.2)
        n = len(spans(recv.rx, server__port=port))
        assert 10 <= n <= 20, f"{n} spans for 120 candidates in two bursts 1.2 s apart, 5 allowed per second"
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        if a is not None:
            a.kill()
        recv.stop()
