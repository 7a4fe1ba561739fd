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
