"""Probes are discovered through the `otelbpf.probes` entry-point group, so
an installed third-party package adds one without touching the agent."""
from __future__ import annotations

from conftest import run_cli

THIRD_PARTY = '''
from collector.config import Field
from collector.probe import Probe

class HelloProbe(Probe):
    name = "hello"
    description = "a third-party probe"
    requires = ()
    config_schema = {"greeting": Field("str", "hi", "what to say")}

    def start(self):
        pass

    def collect(self):
        return []

    def stop(self):
        pass
'''


def _install_fake_dist(tmp_path, entry_points: str) -> str:
    (tmp_path / "hello_probe.py").write_text(THIRD_PARTY)
    info = tmp_path / "hello_probe-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-probe\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(entry_points)
    return str(tmp_path)


def test_third_party_probe_is_listed_configured_and_run(tmp_path):
    path = _install_fake_dist(tmp_path, "[otelbpf.probes]\nhello = hello_probe:HelloProbe\n"
                                        "broken = hello_probe:DoesNotExist\n")
    env = {"PYTHONPATH": path}
    listed = run_cli("probes", env=env)
    assert listed.returncode == 0
    assert "syscall_latency" in listed.stdout
    lines = {l.split()[0]: l for l in listed.stdout.splitlines()}
    assert "a third-party probe  [hello-probe 1.2]" in lines["hello"]
    assert "BROKEN" in lines["broken"] and "DoesNotExist" in lines["broken"]

    cfg = tmp_path / "c.yaml"
    cfg.write_text("probes: {hello: {greeting: hey}}\n")
    assert run_cli("check", "--config", str(cfg), env=env).returncode == 0
    cfg.write_text("probes: {hello: {greting: hey}}\n")
    bad = run_cli("check", "--config", str(cfg), env=env)
    assert bad.returncode == 2 and "did you mean 'greeting'" in bad.stderr

    cfg.write_text("interval: 1s\nexporters: {console: {}}\nprobes: {hello: {}}\n")
    ran = run_cli("run", "--config", str(cfg), "--duration", "1.5", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "probe hello: running" in ran.stderr
