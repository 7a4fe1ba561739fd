"""The prometheus exporter: its naming rules and content negotiation on a few
records, then a real Prometheus server (Debian's) scraping the agent with
every probe on while nginx, timed HTTP servers, a lossy TCP transfer, DNS
and failing syscalls run. PromQL answers are checked against nginx's access
log, the known durations, and every query of the shipped dashboards."""
from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from conftest import ROOT, AgentProcess, curl, needs_root, run_sleepers, wait_until
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from collector import config
from collector.export.prometheus import PrometheusExporter, prometheus_name
from collector.health import HealthServer
from collector.records import Batch, Counter, Gauge, Instrument, Log2Histogram

DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Prometheus 2.42's own Accept header on a scrape
SCRAPER_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------- unit level

BYTES = Instrument("otelbpf.network.io", "By", "Payload bytes")
SYSCALL = Instrument("otelbpf.syscall.duration", "ns", "Syscall latency")
RTT = Instrument("otelbpf.tcp.rtt", "us", "Smoothed RTT")
UP = Instrument("otelbpf.probe.up", "1", "1 when running")
REQUESTS = Instrument("test.requests", "{request}", "Requests")


def sample_batch() -> Batch:
    b = Batch(time_ns=time.time_ns(), resource=Resource({"service.name": "otelbpf", "host.name": "node-1"}))
    b.metrics["otelbpf.probe.test"] = [
        Counter(BYTES, {"network.io.direction": "transmit", "network.peer.port": 443}, 4096, 0),
        # kernel log2 buckets: (0,1], (1,2], (2,4], (4,8] ns and the overflow
        Log2Histogram(SYSCALL, {"syscall.name": "read"}, [1, 0, 2, 3, 0], 31.0, 0),
        Log2Histogram(RTT, {}, [0, 4, 0], 6.0, 0),
        Gauge(UP, {"otelbpf.probe": "test"}, 1),
        Counter(REQUESTS, {"http.response.status_code": 200, "otelbpf.overflow": True}, 7, 0),
    ]
    return b


def scrape(url: str, accept: str = None) -> tuple:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def parse(text: str) -> dict:
    """(sample name, labels without the scope's) -> value."""
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope_")))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def exporter_on_health():
    health = HealthServer("127.0.0.1:0", interval=1.0)
    exp = PrometheusExporter({"listen": None}, health)
    yield health, exp
    exp.shutdown()
    health.close()


def test_naming_rules_on_records(exporter_on_health):
    health, exp = exporter_on_health
    assert exp.export(sample_batch())
    _ctype, text = scrape(f"http://{health.address}/metrics")
    got = parse(text)
    # a counter in By: unit suffix, then _total; attribute names sanitized, values as strings
    assert got[("otelbpf_network_io_bytes_total", (("network_io_direction", "transmit"),
                                                   ("network_peer_port", "443")))] == 4096
    # an ns histogram: _seconds, cumulative buckets with le at the log2 edges in seconds
    read = (("syscall_name", "read"),)
    buckets = {dict(labels)["le"]: v for (name, labels), v in got.items()
               if name == "otelbpf_syscall_duration_seconds_bucket"}
    assert buckets == {"1e-09": 1, "2e-09": 1, "4e-09": 3, "8e-09": 6, "+Inf": 6}
    assert got[("otelbpf_syscall_duration_seconds_count", read)] == 6
    assert got[("otelbpf_syscall_duration_seconds_sum", read)] == pytest.approx(31e-9)
    # us -> seconds too
    assert got[("otelbpf_tcp_rtt_seconds_bucket", (("le", "2e-06"),))] == 4
    assert got[("otelbpf_tcp_rtt_seconds_sum", ())] == pytest.approx(6e-6)
    # "1" and {annotation} units add no suffix
    assert got[("otelbpf_probe_up", (("otelbpf_probe", "test"),))] == 1
    assert got[("test_requests_total", (("http_response_status_code", "200"), ("otelbpf_overflow", "true")))] == 7
    # the resource on target_info, the scope as labels on every series
    assert got[("target_info", (("host_name", "node-1"), ("service_name", "otelbpf")))] == 1
    assert 'otel_scope_name="otelbpf.probe.test"' in text
    assert "# TYPE otelbpf_syscall_duration_seconds histogram" in text
    assert "# TYPE otelbpf_network_io_bytes_total counter" in text


def test_log2_edges_span_the_populated_buckets_and_stay():
    """le edges from the one below the lowest populated bucket to the
    highest (kernel bucket i: (2^(i-1), 2^i] ns); an edge once shown stays."""
    from prometheus_client import CollectorRegistry

    from collector.export.prometheus import MetricsSnapshot, encode
    snap, reg = MetricsSnapshot(), CollectorRegistry()
    reg.register(snap)

    def edges(buckets):
        h = Log2Histogram(SYSCALL, {"syscall.name": "read"}, buckets, 0.0, 0)
        snap.update(Resource({}), {"s": [h]}, 0)
        got = parse(encode(reg, "")[0].decode())
        return sorted((float(dict(labels)["le"]), v) for (name, labels), v in got.items() if name.endswith("_bucket"))
    n = 40
    five_at_10 = [0] * n
    five_at_10[10] = 5
    assert edges(five_at_10) == [(2 ** 9 * 1e-9, 0), (2 ** 10 * 1e-9, 5), (math.inf, 5)]
    later = list(five_at_10)
    later[14] = 1
    assert edges(later) == [(2 ** i * 1e-9, 5 if i >= 10 else 0) for i in range(9, 14)] + [(2 ** 14 * 1e-9, 6),
                                                                                          (math.inf, 6)]
    overflow = list(later)
    overflow[n - 1] = 2          # the kernel's last bucket has no upper edge: +Inf only
    got = edges(overflow)
    assert got[-2][0] == 2 ** (n - 2) * 1e-9 and got[-1] == (math.inf, 8) and got[0][0] == 2 ** 9 * 1e-9
    assert edges([0] * n) == [(2 ** i * 1e-9, 0) for i in range(9, n - 1)] + [(math.inf, 0)]   # shown edges stay


@pytest.mark.parametrize("name,unit,kind,want", [
    ("otelbpf.network.io", "By", "counter", "otelbpf_network_io_bytes_total"),
    ("otelbpf.syscall.duration", "ns", "histogram", "otelbpf_syscall_duration_seconds"),
    ("http.server.request.duration", "s", "histogram", "http_server_request_duration_seconds"),
    ("otelbpf.agent.cpu.time", "s", "counter", "otelbpf_agent_cpu_time_seconds_total"),
    ("otelbpf.agent.memory.rss", "By", "gauge", "otelbpf_agent_memory_rss_bytes"),
    ("otelbpf.probe.up", "1", "gauge", "otelbpf_probe_up"),
    ("otelbpf.dropped", "{event}", "counter", "otelbpf_dropped_total"),
    ("already_total", "", "counter", "already_total")])
def test_prometheus_name(name, unit, kind, want):
    assert prometheus_name(name, unit, kind) == want


def test_openmetrics_when_the_scraper_asks(exporter_on_health):
    health, exp = exporter_on_health
    exp.export(sample_batch())
    url = f"http://{health.address}/metrics"
    ctype, text = scrape(url)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in text and "# UNIT" not in text
    ctype, om = scrape(url, SCRAPER_ACCEPT)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert om.rstrip().endswith("# EOF")
    assert "# UNIT otelbpf_syscall_duration_seconds seconds" in om
    assert "# TYPE target info" in om
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    samples = {s.name for fam in om_parse(om) for s in fam.samples}
    assert {"otelbpf_network_io_bytes_total", "otelbpf_syscall_duration_seconds_bucket", "target_info"} <= samples
    # the same numbers in both
    assert parse(text)[("otelbpf_syscall_duration_seconds_count", (("syscall_name", "read"),))] == 6
    assert 'otelbpf_syscall_duration_seconds_count{' in om


def test_own_listen_address_and_health_falls_back_to_self_telemetry():
    health = HealthServer("127.0.0.1:0", interval=1.0)
    try:
        exp = PrometheusExporter({"listen": None}, health)
        exp.export(sample_batch())
        assert "otelbpf_network_io_bytes_total" in scrape(f"http://{health.address}/metrics")[1]
        exp.shutdown()   # a reload that removes the exporter: /metrics is the agent's own again
        assert "otelbpf_network_io_bytes_total" not in scrape(f"http://{health.address}/metrics")[1]
        own = PrometheusExporter({"listen": "127.0.0.1:0"}, None)
        try:
            own.export(sample_batch())
            ctype, text = scrape(f"http://{own.address}/metrics", SCRAPER_ACCEPT)
            assert ctype.startswith("application/openmetrics-text") and "otelbpf_network_io_bytes_total" in text
        finally:
            own.shutdown()
    finally:
        health.close()


@pytest.mark.parametrize("raw,key", [
    ({"health": "", "exporters": {"prometheus": {}}}, "exporters.prometheus.listen"),
    ({"exporters": {"prometheus": {"listen": "nine"}}}, "exporters.prometheus.listen"),
    ({"health": "127.0.0.1:9464", "exporters": {"prometheus": {"listen": "127.0.0.1:9464"}}},
     "exporters.prometheus.listen"),
    ({"exporters": {"prometheus": {"port": 9464}}}, "exporters.prometheus.port")])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(config.ConfigError) as e:
        config.build(raw, {}, env={})
    assert e.value.key == key and e.value.fix


# --------------------------------------------------- a real Prometheus server

class PrometheusServer:
    """Debian's prometheus scraping `target` every second, its data in d."""

    def __init__(self, d, target: str):
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "scrape_configs": [{"job_name": "otelbpf", "scrape_interval": "1s", "scrape_timeout": "1s",
                                   "static_configs": [{"targets": [target]}]}]}
        (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(d / "prometheus.log", "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={d / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (d / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def get(self, path: str, **params) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params, doseq=True)}",
                                    timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list:
        data = self.get("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", (promql, data)
        return data["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """nginx, timed servers and a veth pair; the agent with every probe and
    the prometheus exporter on its health address; Prometheus scraping it;
    then the traffic. Yields what the tests compare against."""
    if not (shutil.which("nginx") and shutil.which("wrk") and shutil.which("prometheus")):
        pytest.skip("needs nginx, wrk and prometheus (make setup installs them)")
    from test_dashboards import TRAFFIC
    from test_http import DELAYS, PORTS, TIMED_SERVER, Nginx, _timed_requests, wrk
    from test_net_flows import drop_some_on_server_ingress, transfer, veth_namespaces
    d = tmp_path_factory.mktemp("prom")
    nginx = Nginx(tmp_path_factory.mktemp("nginx"))
    timed_ports = {free_port(): delay for delay in DELAYS}
    timed = subprocess.Popen([sys.executable, "-c", TIMED_SERVER, *(f"{p}={t}" for p, t in timed_ports.items())],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    agent = prom = None
    try:
        with veth_namespaces():
            assert timed.stdout.readline().strip() == "ready"
            health = f"127.0.0.1:{free_port()}"
            agent = AgentProcess(d, {"interval": "1s", "health": health, "lock_file": str(d / "lock"),
                                     "exporters": {"prometheus": {}},
                                     "probes": {"syscall_latency": {}, "cpu_profile": {}, "http": {},
                                                "net_flows": {"udp": True}}})
            agent.wait_for_log("collecting every", timeout=60)
            prom = PrometheusServer(d, health)
            assert wait_until(lambda: prom.query('up{job="otelbpf"} == 1'), timeout=20), "no successful scrape"
            # traffic: nginx (statuses 200, 404, 301, 500), known durations,
            # retransmits, DNS and syscall errors
            base = f"http://127.0.0.1:{PORTS['count']}"
            wrk(f"{base}/", seconds=2)
            wrk(f"{base}/missing", seconds=1, conns=4)
            curl(*([f"{base}/old"] * 15 + [f"{base}/boom"] * 10))
            curl("-X", "POST", "-d", "x=1", *([f"{base}/"] * 5))
            truth = _timed_requests(timed_ports)
            sleeps = run_sleepers(SLEEPS)
            drop_some_on_server_ingress()
            retrans = 0
            for _ in range(5):   # the drop program drops a share at random: retry until enough
                retrans += transfer(2_000_000, 1000)[2]
                if retrans > 5:
                    break
            subprocess.run([sys.executable, "-c", TRAFFIC], check=True, timeout=60, cwd=d)
            yield {"prom": prom, "agent": agent, "nginx": nginx, "port": PORTS["count"], "timed": truth, "sleeps": sleeps,
                   "retransmits": retrans}
    finally:
        if prom is not None:
            prom.stop()
        if agent is not None:
            rc = agent.stop()
            assert rc == 0 and "Traceback" not in agent.stderr(), agent.stderr()
        timed.kill()
        timed.wait()
        nginx.stop()


@needs_root
def test_request_counts_per_status_equal_nginx_access_log(stack):
    from test_http import log_counts
    prom, port = stack["prom"], stack["port"]
    expected = log_counts(stack["nginx"].log_lines(port))
    assert sum(expected.values()) > 100 and {s for _m, s in expected} == {200, 301, 404, 500}

    def counted():
        rows = prom.query("sum by (http_request_method, http_response_status_code) "
                          f'(http_server_request_duration_seconds_count{{job="otelbpf", server_port="{port}"}})')
        return {(r["metric"]["http_request_method"], int(r["metric"]["http_response_status_code"])):
                int(float(r["value"][1])) for r in rows}
    got = wait_until(lambda: (c := counted()) == dict(expected) and c, timeout=20) or counted()
    assert got == dict(expected), f"Prometheus {got} vs access log {dict(expected)}"


@needs_root
def test_known_durations_fall_in_their_le_bucket(stack):
    """Each timed request (one per server) in the first le bucket that
    counts it: its bound is at least the server's delay, and the bound below
    it is less than curl's whole time."""
    prom = stack["prom"]
    for port, (lo, hi) in stack["timed"].items():
        def buckets():
            rows = prom.query(f'http_server_request_duration_seconds_bucket{{server_port="{port}"}}')
            return sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in rows)
        rows = wait_until(lambda: (b := buckets()) and b[-1][1] == 1 and b, timeout=20) or buckets()
        assert rows and rows[-1] == (math.inf, 1.0), (port, rows)
        first = next(i for i, (_le, v) in enumerate(rows) if v >= 1)
        upper, lower = rows[first][0], (rows[first - 1][0] if first else 0.0)
        assert upper >= lo and lower < hi, f"port {port}: true duration in [{lo}, {hi}] s, bucket ({lower}, {upper}]"
        # histogram_quantile reads the same bucket: within its bounds
        q = prom.query(f'histogram_quantile(0.5, sum by (le) '
                       f'(http_server_request_duration_seconds_bucket{{server_port="{port}"}}))')
        assert lower <= float(q[0]["value"][1]) <= upper, (port, q)
    # syscall durations: the kernel's log2 edges, 2^k ns, in seconds
    les = {float(r["metric"]["le"]) for r in prom.query('otelbpf_syscall_duration_seconds_bucket'
                                                          '{syscall_name="read"}')} - {math.inf}
    assert len(les) >= 3
    for le in les:
        k = math.log2(le / 1e-9)
        assert abs(k - round(k)) < 1e-9 and 0 <= k <= 38, le


SLEEPS = {20_000_000: 3}   # nanosleep ns -> calls (one sc_workload)


@needs_root
def test_known_sleeps_fall_in_their_le_bucket(stack):
    """nanosleeps of known length, through the real syscall_latency program
    and the scrape: the first le bucket that holds them all has a bound at
    least the requested time, and the bound below it is under the longest
    they can have taken (an ns value left unconverted, or converted twice,
    lands elsewhere). The workload has exited, its series gone stale: read
    the last value each series had (per pid or per executable)."""
    prom = stack["prom"]
    (_pid, n, lo_ns, hi_ns), = stack["sleeps"].values()

    def buckets():
        rows = prom.query('sum by (le) (max_over_time(otelbpf_syscall_duration_seconds_bucket'
                          '{syscall_name="nanosleep", process_executable_name="sc_workload"}[5m]))')
        return sorted((float(r["metric"]["le"]), float(r["value"][1])) for r in rows)
    rows = wait_until(lambda: (b := buckets()) and b[-1][1] == n and b, timeout=20) or buckets()
    assert rows and rows[-1] == (math.inf, float(n)), rows
    first = next(i for i, (_le, v) in enumerate(rows) if v >= n)
    upper, lower = rows[first][0], (rows[first - 1][0] if first else 0.0)
    assert upper >= lo_ns * 1e-9 and lower < hi_ns * 1e-9, \
        f"true durations in [{lo_ns}, {hi_ns}] ns, bucket ({lower}, {upper}] s"


def dashboard_queries() -> list:
    """(dashboard, panel title, PromQL) for every Prometheus target of every
    shipped dashboard, template variables as match-all regexes and
    $__rate_interval as 30s."""
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        variables = [v["name"] for v in d.get("templating", {}).get("list", [])]
        for p in d["panels"]:
            for t in p.get("targets", []):
                ds = t.get("datasource") or p.get("datasource") or {}
                if ds.get("type") != "prometheus" or not t.get("expr"):
                    continue
                expr = t["expr"].replace("$__rate_interval", "30s")
                for v in variables:
                    expr = re.sub(r"\$\{?" + v + r"\b\}?", ".*", expr)
                assert "$" not in expr, (path.name, expr)
                out.append((path.name, p["title"], expr))
    return out


@needs_root
def test_every_dashboard_query_returns_data(stack):
    prom = stack["prom"]
    assert stack["retransmits"] > 5, "the drop program provoked too few retransmissions"
    queries = dashboard_queries()
    assert len(queries) >= 15   # every panel of the four dashboards that reads Prometheus

    def empty():
        missing = []
        for dash, title, expr in queries:
            values = [float(r["value"][1]) for r in prom.query(expr)]
            if not any(not math.isnan(v) for v in values):
                missing.append((dash, title, expr, values[:3]))
        return missing
    missing = [] if wait_until(lambda: not empty(), timeout=20) else empty()
    assert not missing, "queries without data:\n" + "\n".join(map(str, missing))
    # the HTTP dashboard's $service variable: label_values(http_server_request_duration_seconds_count, job)
    jobs = prom.get("/api/v1/label/job/values", **{"match[]": "http_server_request_duration_seconds_count"})
    assert jobs == ["otelbpf"]
