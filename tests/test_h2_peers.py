"""The HTTP/2 and gRPC rigs of tests/h2_peers.py on their own, no agent:
each peer's ground truth agrees with the other side's, request for request,
so the http probe's HTTP/2 tests can hold the agent to it. Each rig is gone
(its whole process group) once its block ends."""
from __future__ import annotations

import collections
import os
import re
import shutil

import pytest

import h2_peers as hp

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("nginx", "h2load", "curl", "openssl")),
                                reason="needs nginx, h2load (nghttp2-client), curl and openssl (make setup)")
needs_node = pytest.mark.skipif(not os.path.exists(hp.NODE), reason="needs node")
TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


def gone(pid: int) -> bool:
    """No process is left in the group (session) pid led."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    with hp.nginx_h2(tmp_path_factory.mktemp("nginx-h2")) as n:
        yield n
    assert gone(n.pid)


PATHS = {"/": 200, "/missing": 404, "/boom": 500, "/big": 200, "/users/7": 200}


@pytest.mark.parametrize("kind", ["h2c", "h2"])
def test_curl_statuses_and_traceparents_are_nginx_log_lines(nginx, kind):
    port = nginx.h2c_port if kind == "h2c" else nginx.tls_port
    sent = {}
    for path, want in PATHS.items():
        tp = hp.random_traceparent()
        assert hp.curl_h2(nginx.url(kind, path), traceparent=tp) == want
        sent[path] = tp
    assert hp.curl_h2(nginx.url(kind, "/"), method="HEAD") == 200
    expected = collections.Counter(("HTTP/2.0", "GET", p, s) for p, s in PATHS.items())
    expected[("HTTP/2.0", "HEAD", "/", 200)] += 1
    assert nginx.counts(port, expect=len(PATHS) + 1) == expected
    lines = nginx.lines(port)
    assert {ln.path: ln.traceparent for ln in lines if ln.method == "GET"} == sent
    assert all(ln.completed for ln in lines)    # curl read every response whole
    big = next(ln for ln in lines if ln.path == "/big")
    assert big.bytes_sent > hp.BIG_BYTES


def test_the_http1_port_stays_http1(nginx):
    from conftest import curl
    assert curl(nginx.url("h1", "/missing")).strip() == "404"
    assert nginx.counts(nginx.h1_port, expect=1) == {("HTTP/1.1", "GET", "/missing", 404): 1}
    with pytest.raises(RuntimeError):      # curl_h2 takes nothing but HTTP/2
        hp.curl_h2(nginx.url("h1", "/"))


@pytest.mark.parametrize("kind", ["h2c", "h2"])
def test_h2load_counts_are_nginx_log_lines(nginx, kind):
    port = nginx.h2c_port if kind == "h2c" else nginx.tls_port
    before = nginx.counts(port)
    paths = ["/", "/missing", "/boom", "/big"]
    r = hp.h2load([nginx.url(kind, p) for p in paths], n=400, c=4, m=8, threads=2)
    assert r.protocol == kind
    assert (r.done, r.succeeded, r.errored, r.timeout) == (400, 200, 0, 0)
    assert r.status == {"2xx": 200, "3xx": 0, "4xx": 100, "5xx": 100} and r.rps > 0
    logged = nginx.counts(port, expect=sum(before.values()) + 400) - before
    # h2load takes the paths in turn on each connection: 100 each
    assert logged == {("HTTP/2.0", "GET", p, PATHS[p]): 100 for p in paths}
    classes = collections.Counter(f"{s // 100}xx" for (_pr, _m, _p, s), n in logged.items() for _ in range(n))
    assert {k: classes.get(k, 0) for k in r.status} == r.status


def test_h2load_for_a_duration_nginx_logs_what_it_started(nginx):
    """-D stops with streams in flight: h2load's done leaves them out, nginx
    logs those it answered; never more than h2load started."""
    before = sum(nginx.counts(nginx.h2c_port).values())
    r = hp.h2load(nginx.url("h2c", "/"), c=4, m=4, duration=1)
    logged = sum(nginx.counts(nginx.h2c_port).values()) - before
    assert r.done > 0 and r.errored == 0
    assert r.done <= logged <= r.started


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_grpc_server_counts_are_the_client_results(tmp_path, tls):
    with hp.grpc_server(tmp_path, tls=tls) as srv:
        res = hp.grpc_client(srv.target, unary=6, fail=3, slow=2, stream=4, stream_messages=5, deadline=0.2,
                             traceparent="random", parallel=4, tls_cert=srv.cert)
        server = srv.counts()
        assert res["pid"] != os.getpid() and srv.pid != os.getpid()
    assert gone(srv.pid)
    client = hp.grpc_call_counts(res)
    assert client == {("/demo.Echo/Unary", "OK"): 6, ("/demo.Echo/Fail", "NOT_FOUND"): 3,
                      ("/demo.Echo/Slow", "DEADLINE_EXCEEDED"): 2, ("/demo.Echo/Stream", "OK"): 4}
    assert server == client
    calls = res["calls"]
    assert all(TRACEPARENT_RE.match(c["traceparent"]) for c in calls)
    assert len({c["traceparent"] for c in calls}) == len(calls)
    assert all(c["messages"] == 5 for c in calls if c["method"].endswith("/Stream"))
    assert all(c["details"] == "no such thing" for c in calls if c["code"] == "NOT_FOUND")
    assert hp.GRPC_CODES["DEADLINE_EXCEEDED"] == 4 and hp.GRPC_CODES["NOT_FOUND"] == 5


def test_grpc_slow_call_inside_its_deadline_is_ok(tmp_path):
    """The deadline decides Slow's fate on both sides: with a deadline past
    the server's wait it is an OK call for both."""
    with hp.grpc_server(tmp_path, slow_seconds=0.1) as srv:
        res = hp.grpc_client(srv.target, slow=2, deadline=2.0)
        assert srv.counts() == hp.grpc_call_counts(res) == {("/demo.Echo/Slow", "OK"): 2}


@needs_node
@pytest.mark.parametrize("kind", ["h2c", "h2"])
def test_node_server_counts_are_the_client_results(tmp_path, kind):
    paths = ["/", "/missing", "/boom", "/big", "/slow", "/nope"]
    with hp.node_h2_server(tmp_path) as srv:
        res = hp.node_h2_client(srv.url(kind), paths, n=3, concurrency=4, traceparent="random", ca=srv.cert)
        post = hp.node_h2_client(srv.url(kind), ["/echo"], n=2, method="POST", body="x" * 3000, ca=srv.cert)
        server = srv.counts()
    assert gone(srv.pid)
    client = hp.node_call_counts(res) + hp.node_call_counts(post)
    want = {"/": 200, "/missing": 404, "/boom": 500, "/big": 200, "/slow": 200, "/nope": 404}
    assert client == {**{("GET", p, s): 3 for p, s in want.items()}, ("POST", "/echo", 200): 2}
    assert server == client
    assert all(c["bytes"] == hp.BIG_BYTES for c in res["calls"] if c["path"] == "/big")
    assert all(c["bytes"] == 3000 for c in post["calls"])
    assert len({c["traceparent"] for c in res["calls"]}) == len(res["calls"])


@needs_node
def test_node_server_counts_h2load_and_curl(tmp_path):
    with hp.node_h2_server(tmp_path) as srv:
        r = hp.h2load([srv.url("h2", "/"), srv.url("h2", "/boom")], n=40, c=2, m=4)
        assert hp.curl_h2(srv.url("h2c", "/missing")) == 404
        server = srv.counts()
    assert r.protocol == "h2" and r.status == {"2xx": 20, "3xx": 0, "4xx": 0, "5xx": 20}
    assert server == {("GET", "/", 200): 20, ("GET", "/boom", 500): 20, ("GET", "/missing", 404): 1}
