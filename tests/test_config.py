"""Config parsing and validation (no kernel needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from collector import config
from collector.config import ConfigError, parse_bytes, parse_duration
from probes.cpu_profile import CpuProfileProbe
from probes.http import HttpProbe
from probes.net_flows import NetFlowsProbe
from probes.syscall_latency import SyscallLatencyProbe

SCHEMAS = {"syscall_latency": SyscallLatencyProbe.config_schema, "cpu_profile": CpuProfileProbe.config_schema,
           "net_flows": NetFlowsProbe.config_schema, "http": HttpProbe.config_schema}
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text,secs", [("10s", 10), ("500ms", .5), ("2m", 120), ("1h", 3600), (3, 3),
                                       ("1.5s", 1.5), ("250us", 250e-6), (" 7 ", 7)])
def test_durations(text, secs):
    assert parse_duration(text, "k") == pytest.approx(secs)


@pytest.mark.parametrize("text,n", [("64MiB", 64 << 20), ("512KiB", 512 << 10), ("1GiB", 1 << 30), (4096, 4096),
                                    ("100", 100), ("100B", 100)])
def test_sizes(text, n):
    assert parse_bytes(text, "k") == n


@pytest.mark.parametrize("bad", ["", "64MB", "-1", "1.5MiB", True, [1], None])
def test_bad_sizes_name_the_key(bad):
    with pytest.raises(ConfigError) as e:
        parse_bytes(bad, "export_queue_memory")
    assert e.value.key == "export_queue_memory" and "64MiB" in str(e.value)


@pytest.mark.parametrize("bad", ["", "ten", "10 parsecs", "-1s", 0, True, [1], None])
def test_bad_durations_name_the_key(bad):
    with pytest.raises(ConfigError) as e:
        parse_duration(bad, "probes.x.window")
    assert e.value.key == "probes.x.window"
    assert "10s" in str(e.value) or "positive" in str(e.value)


def test_embedded_default_runs_every_probe_with_console():
    cfg = config.build(None, SCHEMAS, env={})
    assert cfg.interval == 10
    assert list(cfg.exporters) == ["console"]
    assert cfg.probes["syscall_latency"]["enabled"] is True
    assert cfg.probes["syscall_latency"]["top_processes"] == 50


def test_otel_env_endpoint_adds_otlp_to_the_default():
    cfg = config.build(None, SCHEMAS, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert set(cfg.exporters) == {"console", "otlp"}
    assert cfg.exporters["otlp"]["endpoint"] is None  # left to the SDK, which reads the variable


def test_listed_probes_only():
    cfg = config.build({"probes": {}}, SCHEMAS)
    assert cfg.probes == {}


def test_contract_keys_from_the_issue():
    raw = yaml.safe_load("""
interval: 10s
resource: {team: infra}
exporters:
  otlp: {endpoint: http://127.0.0.1:4317, protocol: grpc, headers: {x-token: abc}, insecure: true}
  file: {path: /tmp/otelbpf-test/telemetry.jsonl}
  console: {}
probes:
  syscall_latency: {enabled: true}
""")
    cfg = config.build(raw, SCHEMAS)
    assert cfg.exporters["otlp"] == {**cfg.exporters["otlp"], "endpoint": "http://127.0.0.1:4317",
                                     "protocol": "grpc", "headers": {"x-token": "abc"}, "insecure": True}
    assert cfg.resource == {"team": "infra"}
    assert cfg.exporters["file"]["path"] == "/tmp/otelbpf-test/telemetry.jsonl"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        config.build({"probes": {"syscall_latency": {"top_process": 3}}}, SCHEMAS)
    assert e.value.key == "probes.syscall_latency.top_process"
    assert "did you mean 'top_processes'" in str(e.value)


def test_minimum_is_enforced():
    with pytest.raises(ConfigError) as e:
        config.build({"probes": {"syscall_latency": {"max_keys": 3}}}, SCHEMAS)
    assert "at least 64" in str(e.value)


def test_yaml_syntax_error_has_position():
    with pytest.raises(ConfigError) as e:
        config.load_text("a: 1\nb: [\n", "x.yaml")
    assert "x.yaml at line" in str(e.value)


def test_shipped_config_documents_every_key():
    """config/otelbpf.yaml shows every key of every schema (commented or not)."""
    text = (ROOT / "config" / "otelbpf.yaml").read_text()
    keys = set(config.TOP_SCHEMA) | set(config.TOP_SCHEMA["kernel"]) | set(config.TOP_SCHEMA["kubernetes"])
    keys |= set(config.TOP_SCHEMA["process"])
    for schema in config.EXPORTER_SCHEMAS.values():
        keys |= set(schema)
    keys |= set(SyscallLatencyProbe.config_schema) | set(CpuProfileProbe.config_schema) | {"enabled"}
    keys |= set(NetFlowsProbe.config_schema) | set(HttpProbe.config_schema)
    missing = [k for k in sorted(keys) if f"{k}:" not in text]
    assert not missing, f"undocumented keys in config/otelbpf.yaml: {missing}"
    cfg = config.build(yaml.safe_load(text), SCHEMAS)
    default = config.build(None, SCHEMAS, env={})
    assert cfg.probes == default.probes and cfg.interval == default.interval
