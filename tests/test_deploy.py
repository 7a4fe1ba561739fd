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
    assert "# TYPE otelbpf_dropped_total counter" in text
    assert 'otelbpf_dropped_total{otelbpf_probe="syscall_latency",reason="slot_collision"}' in text
    assert 'otelbpf_probe_up{otelbpf_probe="syscall_latency"} 1' in text
    assert "otelbpf_agent_memory_rss" in text
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
