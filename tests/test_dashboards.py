"""The Grafana dashboards and the demo stack's files against what the agent
really sends: every metric a dashboard queries must be one a real run
exported (named by the OpenTelemetry Prometheus compatibility rules, as
Prometheus names OTLP metrics and as the agent's own /metrics does), and
every data source a panel names must be provisioned. tests/test_prometheus.py
runs every dashboard query against a real Prometheus scraping the agent."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from conftest import ROOT, AgentProcess, needs_root
from otlp_data import metrics

DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Metrics that exist only when their event happens: a short loopback run has
# no TCP retransmits. They are checked against the probe's declaration.
EVENT_DRIVEN = {"otelbpf.tcp.retransmits": ("{segment}", "sum")}


def prometheus_names(name: str, unit: str, kind: str) -> set:
    """The series names of an OTLP metric in Prometheus: the agent's own
    naming (collector/export/prometheus.py), so the demo stack (OTLP into
    Prometheus) and a scrape of /metrics give the dashboards the same names."""
    from collector.export.prometheus import prometheus_name
    base = prometheus_name(name, unit, {"sum": "counter"}.get(kind, kind))
    if kind == "histogram":
        return {base + "_bucket", base + "_count", base + "_sum"}
    return {base}


_METRIC = r"((?:otelbpf|http)_[a-z0-9_]+)"


def queried_metrics(dashboard: dict) -> set:
    """Metric names in the PromQL of every panel and variable: a name is
    followed by a selector or a range ({ or [), stands alone, or is the
    first argument of label_values (label names are none of these)."""
    names = set()
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            expr = t.get("expr", "").strip()
            names |= set(re.findall(_METRIC + r"\s*[{\[]", expr))
            if re.fullmatch(_METRIC, expr):
                names.add(expr)
    for v in dashboard.get("templating", {}).get("list", []):
        names |= set(re.findall(r"label_values\(\s*" + _METRIC, v.get("definition", "")))
    return names


def test_dashboards_parse_and_name_provisioned_datasources():
    assert len(DASHBOARDS) == 4
    provisioned = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources.yaml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] and d["title"] and d["panels"], path.name
        for p in d["panels"]:
            assert p["datasource"]["uid"] in uids, (path.name, p["title"])
            assert p["targets"], (path.name, p["title"])
    dash_dir = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "dashboards.yaml").read_text())
    compose = yaml.safe_load((ROOT / "deploy" / "demo" / "docker-compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.endswith(":" + dash_dir["providers"][0]["options"]["path"] + ":ro") for m in mounts)


def test_demo_stack_files_are_consistent():
    demo = ROOT / "deploy" / "demo"
    compose = yaml.safe_load((demo / "docker-compose.yaml").read_text())
    assert {"otelbpf", "collector", "prometheus", "tempo", "pyroscope", "grafana"} <= set(compose["services"])
    col = yaml.safe_load((demo / "otel-collector.yaml").read_text())
    for name, pipe in col["service"]["pipelines"].items():
        assert set(pipe["receivers"]) <= set(col["receivers"]) and set(pipe["exporters"]) <= set(col["exporters"]), name
    assert {"metrics", "traces", "profiles"} <= set(col["service"]["pipelines"])
    # the agent config the demo mounts is one the agent accepts
    from collector import config
    from collector.probe import discover
    schemas = {n: e.cls.config_schema for n, e in discover().items() if e.cls}
    cfg = config.build(yaml.safe_load((demo / "otelbpf.yaml").read_text()), schemas, env={})
    assert cfg.exporters["otlp"]["histogram"] == "explicit"     # the dashboards query _bucket series
    assert set(cfg.probes) == {"syscall_latency", "cpu_profile", "net_flows", "http"}


TRAFFIC = textwrap.dedent("""
    import http.server, socket, threading, urllib.request
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    for _ in range(20):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.server_address[1]}/").read()
    # a DNS query (type A for example.com) to port 53; nobody needs to answer
    q = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(q, ("127.0.0.1", 53))
    for _ in range(50):
        try:
            open("/nonexistent/x")          # syscall errors
        except OSError:
            pass
    srv.shutdown()
""")


@needs_root
def test_every_dashboard_metric_is_one_the_agent_exports(tmp_path):
    from otlp_receiver import GrpcReceiver
    demo_cfg = yaml.safe_load((ROOT / "deploy" / "demo" / "otelbpf.yaml").read_text())
    recv = GrpcReceiver()
    agent = None
    try:
        cfg = dict(demo_cfg, interval="1s", health="127.0.0.1:0", lock_file=str(tmp_path / "lock"),
                   exporters={"otlp": {"endpoint": recv.endpoint, "protocol": "grpc", "histogram": "explicit"}})
        agent = AgentProcess(tmp_path, cfg)
        agent.wait_for_log("collecting every", timeout=60)
        subprocess.run([sys.executable, "-c", TRAFFIC], check=True, timeout=60, cwd=tmp_path)
        time.sleep(3)
        assert agent.stop() == 0, agent.stderr()
    finally:
        if agent is not None:
            agent.kill()
        recv.stop()
    exported = set()
    names = {m.name for req in recv.rx.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics}
    for name in names:
        for _r, _s, m in metrics(recv.rx.metrics, name):
            exported |= prometheus_names(m.name, m.unit, m.WhichOneof("data") if m.WhichOneof("data") != "gauge"
                                         else "gauge")
            break
    for name, (unit, kind) in EVENT_DRIVEN.items():
        exported |= prometheus_names(name, unit, kind)
    assert "http_server_request_duration_seconds_bucket" in exported
    assert sum(len(queried_metrics(json.loads(p.read_text()))) for p in DASHBOARDS) >= 12   # not vacuous
    for path in DASHBOARDS:
        missing = queried_metrics(json.loads(path.read_text())) - exported
        assert not missing, f"{path.name} queries metrics the agent does not export: {sorted(missing)}"


def test_event_driven_metrics_are_declared_as_assumed():
    from probes.net_flows import RETRANSMITS
    assert (RETRANSMITS.name, RETRANSMITS.unit) == ("otelbpf.tcp.retransmits", EVENT_DRIVEN[RETRANSMITS.name][0])


@pytest.mark.parametrize("name,unit,kind,want", [
    ("http.server.request.duration", "s", "histogram", "http_server_request_duration_seconds_bucket"),
    ("otelbpf.network.io", "By", "sum", "otelbpf_network_io_bytes_total"),
    ("otelbpf.dropped", "{event}", "sum", "otelbpf_dropped_total"),
    ("otelbpf.agent.memory.rss", "By", "gauge", "otelbpf_agent_memory_rss_bytes"),
    ("otelbpf.agent.cpu.time", "s", "sum", "otelbpf_agent_cpu_time_seconds_total"),
    ("otelbpf.probe.up", "1", "gauge", "otelbpf_probe_up")])
def test_prometheus_translation(name, unit, kind, want):
    """What Prometheus's OTLP receiver names these (its translation with
    unit suffixes), which the agent's naming must match."""
    assert want in prometheus_names(name, unit, kind)
