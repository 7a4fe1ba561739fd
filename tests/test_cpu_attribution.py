"""CPU per request: a profile sample carries the HTTP request its thread was
serving (route, method, and the SERVER span's trace and span ids), from the
kernel's per-thread request slot (bpf/thread_request.h).

Real servers whose routes burn CPU, measured by the servers themselves
(their thread CPU time, or the wall time of a synchronous loop), driven by
a real client; the agent (`otelbpf run`, http and cpu_profile probes)
exports to a real OTLP receiver, and `otelbpf profile` writes pprof that
`go tool pprof` reads. Attribution is compared with what the servers say
they burned, within four standard errors of the sampling."""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, AgentProcess, needs_root, wait_until, within_sampling
from otlp_data import linked_samples, points, server_spans
from pprof_tool import go_pprof_runner, raw_samples

pytestmark = needs_root

PEERS = Path(__file__).parent / "peers"
HEAVY_UNITS, LIGHT_UNITS = 30, 10


def start_server(cmd: list, cwd=None):
    # cwd: node with --perf-basic-prof leaves an isolate-*-v8.log behind
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd)
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", f"server did not start: {line}"
    return proc, int(line[1]), int(line[2])


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def connect(port: int, tls: bool, timeout: float) -> http.client.HTTPConnection:
    if tls:
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ssl._create_unverified_context())
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def server_stats(port: int, tls: bool = False) -> dict:
    c = connect(port, tls, 30)
    c.request("GET", "/stats")
    return json.loads(c.getresponse().read())


def drive(port: int, requests: int, connections: int, traced_every: int = 0, tls: bool = False) -> dict:
    """Keep-alive clients alternating /heavy and /light; every traced_every-th
    request carries a fresh sampled traceparent. -> {trace id hex: route}."""
    sent: dict = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        c = connect(port, tls, 60)
        for i in range(requests):
            route, units = ("/heavy", HEAVY_UNITS) if (i + k) % 2 else ("/light", LIGHT_UNITS)
            headers = {}
            if traced_every and i % traced_every == 0:
                trace = f"{random.getrandbits(128) | 1:032x}"
                headers["traceparent"] = f"00-{trace}-{random.getrandbits(64) | 1:016x}-01"
                with lock:
                    sent[trace] = route
            c.request("GET", f"{route}?units={units}", headers=headers)
            r = c.getresponse()
            r.read()
            assert r.status == 200
        c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return sent


def agent_config(tmp_path, endpoint: str, profiler_first: bool = False, tls: bool = False) -> dict:
    """Spans only for requests whose traceparent asks for one: the rest are
    attributed by route, with no span to link to. The probes start in the
    order given, so either can be the one that creates the shared map."""
    probes = {"http": {"tls": tls, "sample_ratio": 0.0}, "cpu_profile": {}}
    if profiler_first:
        probes = dict(reversed(list(probes.items())))
    return {"interval": "1s", "lock_file": str(tmp_path / "lock"), "health": "127.0.0.1:0",
            "exporters": {"otlp": {"endpoint": endpoint, "protocol": "grpc"}}, "probes": probes}


def exported_samples(rx, pid: int) -> list:
    with rx.lock:
        return linked_samples(list(rx.profiles), pid)


def exported_server_spans(rx, port: int) -> dict:
    with rx.lock:
        return server_spans(list(rx.traces), port)


def counter(rx, name: str, **match) -> int:
    """The latest value of a cumulative counter series."""
    with rx.lock:
        reqs = list(rx.metrics)
    return max((dp.as_int for _m, dp, _a in points(reqs, name, **match)), default=0)


def run_with_agent(tmp_path, server_cmd: list, workload, profiler_first: bool = False, tls: bool = False):
    """The agent (http + cpu_profile, OTLP gRPC to a receiver) runs while a
    server starts and workload(port) drives it; then the server's /stats.
    -> (receiver data, workload's result, server stats, server pid, port)."""
    from otlp_receiver import GrpcReceiver
    recv = GrpcReceiver()
    a = srv = None
    try:
        a = AgentProcess(tmp_path, agent_config(tmp_path, recv.endpoint, profiler_first, tls))
        a.wait_for_log("collecting every", timeout=90)
        srv, port, pid = start_server(server_cmd, cwd=tmp_path)
        result = workload(port)
        time.sleep(0.5)   # (Node's after-response burn of the last request)
        stats = server_stats(port, tls)
        time.sleep(2.5)   # the last interval's samples and spans
        assert a.stop() == 0 and "Traceback" not in a.stderr(), a.stderr()
    finally:
        if a is not None:
            a.kill()
        if srv is not None:
            stop(srv)
        recv.stop()
    return recv.rx, result, stats, pid, port


def by_route(samples: list) -> dict:
    out: dict = {}
    for attrs, _link, _names, n in samples:
        route = attrs.get("http.route")
        out[route] = out.get(route, 0) + n
    return out


def assert_samples_link_to_their_spans(samples: list, spans: dict, sent: dict) -> dict:
    """Each linked sample links to a trace the client sent, to that trace's
    SERVER span, and has that request's route; each span's
    otelbpf.cpu.samples is the count of samples linked to it (so every
    sample the kernel counted in a traced request carries the link).
    -> span id -> samples linked to it."""
    assert len(spans) == len(sent), f"{len(spans)} SERVER spans for {len(sent)} traced requests"
    linked: dict = {}
    for attrs, link, _names, n in samples:
        if link is None:
            continue
        trace, span = link
        assert trace in sent, f"a sample links to trace {trace}, which no request carried"
        assert span in spans and spans[span][0] == trace, f"sample's span {span} is not its trace's SERVER span"
        assert attrs["http.route"] == sent[trace] == spans[span][1]["http.route"]
        assert attrs["http.request.method"] == "GET"
        linked[span] = linked.get(span, 0) + n
    for span, (_trace, sattrs) in spans.items():
        assert sattrs.get("otelbpf.cpu.samples", 0) == linked.get(span, 0), (span, sattrs, linked.get(span))
        if linked.get(span):
            assert sattrs["pyroscope.profile.id"] == span
    assert linked, "no sample linked to a span"
    return linked


# ---------------------------------------------------------------- threads

def test_thread_per_request_server_samples_follow_routes_and_link_to_spans(tmp_path):
    """ThreadingHTTPServer (a thread per connection): samples per route
    within 4 SE of the CPU the server measured per route; every sample of a
    request that carried a traceparent links to that trace and to its
    SERVER span, whose otelbpf.cpu.samples counts them; the background
    thread's samples (outside any request) are unattributed, and counted."""
    rx, sent, stats, pid, port = run_with_agent(
        tmp_path, [sys.executable, str(PEERS / "cpu_routes_server.py"), "--background-duty", "0.2"],
        lambda port: drive(port, requests=90, connections=2, traced_every=3))
    samples = exported_samples(rx, pid)
    routes = by_route(samples)
    heavy, light = routes.get("/heavy", 0), routes.get("/light", 0)
    cpu = {r: v["cpu_ns"] for r, v in stats["routes"].items()}
    assert stats["routes"]["/heavy"]["requests"] == stats["routes"]["/light"]["requests"] == 90
    assert heavy + light >= 200, f"too few attributed samples to judge: {routes}"
    within_sampling(heavy, heavy + light, cpu["/heavy"] / (cpu["/heavy"] + cpu["/light"]), "/heavy's share")
    # ...and the attributed total is what the handlers burned at 99 Hz
    expected = (cpu["/heavy"] + cpu["/light"]) * 99 / 1e9
    assert abs(heavy + light - expected) <= 4 * math.sqrt(expected) + 0.05 * expected, (heavy + light, expected)

    linked = assert_samples_link_to_their_spans(samples, exported_server_spans(rx, port), sent)
    traced_cpu = sum(t["cpu_ns"] for t in stats["traces"].values())
    assert set(stats["traces"]) == set(sent)
    within_sampling(sum(linked.values()), heavy + light, traced_cpu / (cpu["/heavy"] + cpu["/light"]),
                    "traced requests' share")

    # outside any request: unattributed, and counted
    background = [(attrs, link, n) for attrs, link, _names, n in samples if attrs.get("thread.name") == "bgburn"]
    bg = sum(n for _a, _l, n in background)
    assert bg >= 0.5 * stats["background_cpu_ns"] * 99 / 1e9, (bg, stats["background_cpu_ns"])
    assert all("http.route" not in attrs and link is None for attrs, link, _n in background)
    unattributed = counter(rx, "otelbpf.profiler.request.samples", otelbpf__request="unattributed")
    attributed = counter(rx, "otelbpf.profiler.request.samples", otelbpf__request="attributed")
    assert unattributed >= bg and attributed >= heavy + light, (unattributed, bg, attributed, heavy + light)


def test_tls_server_samples_follow_routes_and_link_to_spans(tmp_path):
    """The same server over HTTPS (Python's ssl module on Debian's libssl):
    the request starts when SSL_read returns on the serving thread, so
    attribution and links hold as in plaintext."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem"), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    rx, sent, stats, pid, port = run_with_agent(
        tmp_path, [sys.executable, str(PEERS / "cpu_routes_server.py"), "--background-duty", "0",
                   "--tls", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")],
        lambda port: drive(port, requests=60, connections=2, traced_every=3, tls=True), tls=True)
    samples = exported_samples(rx, pid)
    routes = by_route(samples)
    heavy, light = routes.get("/heavy", 0), routes.get("/light", 0)
    cpu = {r: v["cpu_ns"] for r, v in stats["routes"].items()}
    assert heavy + light >= 150, f"too few attributed samples to judge: {routes}"
    within_sampling(heavy, heavy + light, cpu["/heavy"] / (cpu["/heavy"] + cpu["/light"]), "/heavy's share")
    spans = exported_server_spans(rx, port)
    assert all(a["url.scheme"] == "https" for _t, a in spans.values())
    assert_samples_link_to_their_spans(samples, spans, sent)


# ---------------------------------------------------------------- event loop

def test_event_loop_server_attributes_only_between_read_and_write(tmp_path):
    """Node's http server (one thread, many requests): a sample goes to the
    request the thread read and has not answered yet. Each handler burns in
    the request, then as much again after its response is written: the
    after-response burn is never attributed (no request had been read
    since, the client waits for each answer), the in-request burns split
    by route as the server timed them, and the samples of requests that
    carried a traceparent link to their SERVER spans."""
    rx, sent, stats, pid, port = run_with_agent(
        tmp_path, ["node", "--perf-basic-prof", str(PEERS / "cpu_routes_node.js")],
        lambda port: drive(port, requests=120, connections=1, traced_every=3), profiler_first=True)
    samples = exported_samples(rx, pid)
    main = [s for s in samples if s[0].get("thread.name") == "node"]
    routes = by_route(main)
    heavy, light = routes.get("/heavy", 0), routes.get("/light", 0)
    r = stats["routes"]
    assert r["/heavy"]["requests"] == r["/light"]["requests"] == 60
    in_request = r["/heavy"]["handler_ms"] + r["/light"]["handler_ms"]
    after = r["/heavy"]["after_ms"] + r["/light"]["after_ms"]
    assert heavy + light >= 150, f"too few attributed samples to judge: {routes}, server: {r}"
    within_sampling(heavy, heavy + light, r["/heavy"]["handler_ms"] / in_request, "/heavy's share")
    # in-request vs after-response: if finished requests kept their samples,
    # the attributed share would be near 1, not near in / (in + after)
    burning = sum(n for _a, _l, names, n in main if any("burnInRequest" in f or "burnAfterResponse" in f
                                                        for f in names))
    attributed = heavy + light
    within_sampling(attributed, burning, in_request / (in_request + after), "the attributed share of the burns")
    after_samples = [(attrs, link, n) for attrs, link, names, n in main if any("burnAfterResponse" in f for f in names)]
    assert sum(n for _a, _l, n in after_samples) >= 50, "the after-response burn was not sampled by name"
    assert all("http.route" not in attrs and link is None for attrs, link, _n in after_samples), \
        [a for a, _l, _n in after_samples if "http.route" in a][:3]
    in_named = sum(n for attrs, _l, names, n in main if any("burnInRequest" in f for f in names)
                   and "http.route" in attrs)
    assert in_named >= 0.95 * sum(n for _a, _l, names, n in main if any("burnInRequest" in f for f in names))
    assert_samples_link_to_their_spans(samples, exported_server_spans(rx, port), sent)


# ---------------------------------------------------------------- pprof

def test_profile_command_pprof_labels_select_a_route_in_go_pprof(tmp_path):
    """`otelbpf profile` runs the http probe beside the profiler: its pprof
    carries http.route, http.request.method, trace_id and span_id labels as
    `go tool pprof` reads them, -tagfocus on a route keeps exactly that
    route's samples, and --route writes only that route's."""
    go_pprof = go_pprof_runner(tmp_path)
    srv, port, pid = start_server([sys.executable, str(PEERS / "cpu_routes_server.py"), "--background-duty", "0.1"])
    out_all, out_heavy = tmp_path / "all.pb.gz", tmp_path / "heavy.pb.gz"
    try:
        for out, extra in ((out_all, []), (out_heavy, ["--route", "/heavy"])):
            log = tmp_path / f"{out.name}.log"
            with open(log, "w") as err:
                prof = subprocess.Popen([sys.executable, "-m", "collector.cli", "profile", "--duration", "8",
                                         "--pid", str(pid), "--output", str(out), *extra],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
            # both probes loaded and attached (the http probe takes seconds)
            assert wait_until(lambda: "HTTP requests are seen from now on" in log.read_text(), timeout=120), \
                log.read_text()
            drive(port, requests=40, connections=2, traced_every=2)
            prof.communicate(timeout=120)
            assert prof.returncode == 0, log.read_text()
    finally:
        stop(srv)

    got = raw_samples(go_pprof("-raw", str(out_all)))
    routes: dict = {}
    for n, labels in got:
        lab = dict(labels)
        assert lab["process.pid"] == str(pid)
        if "http.route" in lab:
            assert lab["http.request.method"] == "GET"
            routes[lab["http.route"]] = routes.get(lab["http.route"], 0) + n
        if "span_id" in lab:
            assert len(lab["trace_id"]) == 32 and len(lab["span_id"]) == 16 and "http.route" in lab
    assert routes.get("/heavy", 0) > routes.get("/light", 0) > 0, routes
    assert any("span_id" in dict(labels) for _n, labels in got), "no sample carries its request's span"
    focused = raw_samples(go_pprof("-tagfocus=http.route=^/heavy$", "-raw", str(out_all)))
    assert sum(n for n, _ in focused) == routes["/heavy"]
    assert all(dict(labels)["http.route"] == "/heavy" for _n, labels in focused)

    only = raw_samples(go_pprof("-raw", str(out_heavy)))
    assert only and all(dict(labels).get("http.route") == "/heavy" for _n, labels in only)


def test_route_filter_without_requests_is_refused(tmp_path):
    """--route needs the http probe beside the profiler: asked for with
    --no-requests, or with the http probe disabled in the config, the
    command says why and writes nothing."""
    out = tmp_path / "x.pb.gz"
    base = [sys.executable, "-m", "collector.cli", "profile", "--duration", "1", "--route", "/x", "--output", str(out)]
    p = subprocess.run(base + ["--no-requests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--route" in p.stderr and "--no-requests" in p.stderr, p.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("probes: {cpu_profile: {}, http: {enabled: false}}\n")
    p = subprocess.run(base + ["--config", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "probes.http is disabled" in p.stderr, p.stderr
    assert not out.exists()


def test_profile_filters_keep_one_route_or_one_trace():
    """--route and --trace-id as `otelbpf profile` applies them to samples,
    and --trace-id's argument checked."""
    import argparse
    from collector.cli import _sample_wanted, _trace_id, build_parser
    from collector.records import ProfileSample

    def sample(route=None, link=None, pid=7):
        attrs = {"process.pid": pid, **({"http.route": route} if route else {})}
        return ProfileSample(attrs, [], 1, link=link)

    trace = 0x4bf92f3577b34da6a3ce929d0e0e4736
    args = build_parser().parse_args(["profile", "--output", "x", "--trace-id", f"{trace:032x}"])
    assert args.trace_id == trace and args.route is None
    assert _sample_wanted(sample("/a", (trace, 5)), args)
    assert not _sample_wanted(sample("/a", (trace + 1, 5)), args) and not _sample_wanted(sample("/a"), args)
    args = build_parser().parse_args(["profile", "--output", "x", "--route", "/users/{id}", "--pid", "7"])
    assert _sample_wanted(sample("/users/{id}"), args)
    assert not _sample_wanted(sample("/users"), args) and not _sample_wanted(sample(None), args)
    assert not _sample_wanted(sample("/users/{id}", pid=8), args)
    # the command's own process (loading its probes) is never in the profile
    args = build_parser().parse_args(["profile", "--output", "x"])
    assert _sample_wanted(sample(None), args) and not _sample_wanted(sample(None, pid=os.getpid()), args)
    for bad in ("4bf92f35", "0" * 32, "z" * 32):
        with pytest.raises(argparse.ArgumentTypeError):
            _trace_id(bad)
