"""Probes are discovered through the `otelbpf.probes` entry-point group, so
an installed third-party package adds one without touching the agent."""
from __future__ import annotations

import subprocess

from conftest import ROOT, needs_root, run_cli

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


BPF_THIRD_PARTY = '''
from collector.probe import BpfProbe

class RejectedProbe(BpfProbe):
    name = "rejected"
    bpf_object = "{bpf}/verifier_reject.bpf.o"

    def start(self):
        self.open_object().load()

    def collect(self):
        return []

class FallbackProbe(BpfProbe):
    name = "fallback"
    bpf_object = "{bpf}/engine_test.bpf.o"
    # the best build needs a feature no kernel has: the next one is loaded
    bpf_variants = (("{bpf}/verifier_reject.bpf.o", ("no_such_feature",)),
                    ("{bpf}/engine_test.bpf.o", ()))

    def start(self):
        self.open_object().load()

    def collect(self):
        return []
'''


@needs_root
def test_check_loads_each_probe_and_reports_the_verifiers_reason(tmp_path):
    """`check` starts every enabled probe for real: one the verifier rejects
    is "cannot run" with the verifier's reason, never "runs"; a probe whose
    best build needs what the kernel lacks runs with the next build, named."""
    bpf = ROOT / "tests" / "bpf"
    (tmp_path / "bpf_probes.py").write_text(BPF_THIRD_PARTY.replace("{bpf}", str(bpf)))
    info = tmp_path / "bpf_probes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bpf-probes\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[otelbpf.probes]\nrejected = bpf_probes:RejectedProbe\n"
                                           "fallback = bpf_probes:FallbackProbe\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("probes: {rejected: {}, fallback: {}, syscall_latency: {enabled: false}}\n")
    check = run_cli("check", "--config", str(cfg), env={"PYTHONPATH": str(tmp_path)})
    assert check.returncode == 0, check.stderr
    lines = {ln.strip().split(":")[0]: ln.strip() for ln in check.stdout.splitlines() if ln.startswith("  ")}
    assert lines["rejected"].startswith("rejected: cannot run: load verifier_reject.bpf.o: Permission denied"), \
        check.stdout
    assert "verifier:" in lines["rejected"] and "\n" not in lines["rejected"]
    assert lines["fallback"].startswith("fallback: runs (") and "engine_test.bpf.o" in lines["fallback"]
    assert "no_such_feature" in lines["fallback"], lines["fallback"]
    assert lines["syscall_latency"] == "syscall_latency: disabled"
    loaded = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    assert "verifier_rej" not in loaded   # nothing left behind by the trial
