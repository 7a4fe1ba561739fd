"""Config fuzzing: whatever the YAML, the loader and validator give either a
valid configuration or a ConfigError (one line, naming a key) - never
another exception."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import config
from collector.config import ConfigError
from probes.cpu_profile import CpuProfileProbe
from probes.http import HttpProbe
from probes.net_flows import NetFlowsProbe
from probes.syscall_latency import SyscallLatencyProbe

SCHEMAS = {"syscall_latency": SyscallLatencyProbe.config_schema, "cpu_profile": CpuProfileProbe.config_schema,
           "net_flows": NetFlowsProbe.config_schema, "http": HttpProbe.config_schema}
KNOWN_KEYS = sorted(set(config.TOP_SCHEMA) | {"exporters", "probes", "otlp", "file", "console", "kernel"}
                    | set(config.OTLP_SCHEMA) | set(SCHEMAS) | {"enabled"}
                    | {k for s in SCHEMAS.values() for k in s})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["10s", "1ms", "-3s", "grpc", "http/protobuf", "/tmp/x",
                                                           "explicit", "process", "cgroup", "read"]))
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(0, 5))
documents = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                           st.dictionaries(keys, children, max_size=6)),
                         max_leaves=30)


def _check(raw) -> None:
    try:
        cfg = config.build(raw, SCHEMAS, env={})
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg
        return
    assert isinstance(cfg, config.AgentConfig)
    assert 0 < cfg.interval < float("inf")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_structure_is_valid_or_one_clear_error(raw):
    _check(raw)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(config.TOP_SCHEMA) + ["exporters", "probes"]), documents, max_size=5))
def test_top_level_mappings(raw):
    _check(raw)


@given(st.sampled_from(["interval", "export_queue"]), st.sampled_from([float("nan"), float("inf"), -0.0, 1e-12]))
def test_non_finite_and_tiny_numbers(key, value):
    _check({key: value})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_valid_or_one_clear_error(text):
    try:
        raw = config.load_text(text, "fuzz.yaml")
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    _check(raw)
