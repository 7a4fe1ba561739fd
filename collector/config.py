"""YAML configuration -> typed, validated configuration.

Every error is a ConfigError naming the key path and the fix, printed by the
CLI as one line (exit 2). Probes declare their own keys with `Field`s; this
module knows no probe by name.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(text: str) -> str:
    """Control characters (a newline in a key...) shown escaped: one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class ConfigError(Exception):
    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = _one_line(key), problem, fix
        msg = f"{self.key}: {problem}" if key else problem
        super().__init__(_one_line(msg + (f"; {fix}" if fix else "")))


# ---------------------------------------------------------------- field kinds

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, key: str) -> float:
    """'10s', '500ms', '2m', or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not a duration", "write it like 10s, 500ms or 2m")
    if isinstance(value, (int, float)):
        secs = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value):
        num, unit = _DURATION_RE.match(value).groups()
        secs = float(num) * _DURATION_UNITS[unit or "s"]
    else:
        raise ConfigError(key, f"{value!r} is not a duration", "write it like 10s, 500ms or 2m")
    if not math.isfinite(secs) or secs <= 0:
        raise ConfigError(key, f"{value!r} must be a positive, finite duration", "write it like 10s, 500ms or 2m")
    return secs


_BYTES_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_BYTES_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_bytes(value: Any, key: str) -> int:
    """'64MiB', '512KiB', or a number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and _BYTES_RE.match(value):
        num, unit = _BYTES_RE.match(value).groups()
        n = int(num) * _BYTES_UNITS[unit or "B"]
    else:
        raise ConfigError(key, f"{value!r} is not a size", "write it like 64MiB, 512KiB or a number of bytes")
    return n


def _type_name(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "empty"}.get(type(v), type(v).__name__)


def check_power_of_two(v: int, key: str) -> int:
    """Field check for sizes the kernel wants as powers of two."""
    if v & (v - 1):
        raise ConfigError(key, f"{v} is not a power of two", f"use {1 << v.bit_length()}")
    return v


@dataclass
class Field:
    """One configuration key: its kind, default and documentation.

    kind: "bool" | "int" | "float" | "str" | "duration" | "bytes" | "str_map" | "str_list" | "int_list"
    """
    kind: str
    default: Any
    doc: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    check: Optional[Callable[[Any, str], Any]] = None  # extra validation; may normalise

    def parse(self, value: Any, key: str) -> Any:
        if value is None and self.default is None:
            return None
        v = self._parse_kind(value, key)
        if self.choices is not None and v not in self.choices:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, self.choices))}",
                              "use one of those")
        if self.minimum is not None and v < self.minimum:
            raise ConfigError(key, f"{value!r} is below the minimum {self.minimum}", f"use at least {self.minimum}")
        if self.maximum is not None and v > self.maximum:
            raise ConfigError(key, f"{value!r} is above the maximum {self.maximum}", f"use at most {self.maximum}")
        if self.check is not None:
            v = self.check(v, key)
        return v

    def _parse_kind(self, value: Any, key: str) -> Any:
        k = self.kind
        if k == "bool":
            if isinstance(value, bool):
                return value
            raise ConfigError(key, f"expected true or false, got {_type_name(value)} {value!r}", "write true or false")
        if k == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ConfigError(key, f"expected an integer, got {_type_name(value)} {value!r}", "write a whole number")
        if k == "float":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
            raise ConfigError(key, f"expected a number, got {_type_name(value)} {value!r}", "write a number")
        if k == "str":
            if isinstance(value, str):
                return value
            raise ConfigError(key, f"expected a string, got {_type_name(value)} {value!r}", "quote the value")
        if k == "duration":
            return parse_duration(value, key)
        if k == "bytes":
            return parse_bytes(value, key)
        if k == "str_map":
            if value is None:
                return {}
            if not isinstance(value, Mapping):
                raise ConfigError(key, f"expected a mapping, got {_type_name(value)}", "write it as {name: value}")
            out = {}
            for mk, mv in value.items():
                if not isinstance(mk, str) or isinstance(mv, (dict, list)) or mv is None:
                    raise ConfigError(f"{key}.{mk}", "expected a plain string value",
                                      "use name: value pairs with scalar values")
                out[mk] = mv if isinstance(mv, (int, float, bool)) else str(mv)
            return out
        if k in ("str_list", "int_list"):
            if value is None:
                return []
            if not isinstance(value, list):
                raise ConfigError(key, f"expected a list, got {_type_name(value)}", "write it as [a, b]")
            want = str if k == "str_list" else int
            for i, item in enumerate(value):
                if not isinstance(item, want) or isinstance(item, bool):
                    raise ConfigError(f"{key}[{i}]", f"expected {'a string' if want is str else 'an integer'}, "
                                      f"got {_type_name(item)} {item!r}", "fix that list item")
            return list(value)
        raise AssertionError(f"unknown field kind {k}")


Schema = Mapping[str, "Field | Mapping"]  # a Field, or a nested schema


# Keys earlier versions had: a config that still sets one is told what to do.
REMOVED_KEYS = {
    "probes.http.inflight_slots": "delete it: reads and writes are now captured when they return, with nothing "
                                  "kept per thread in between",
}


def parse_section(raw: Any, schema: Schema, key: str) -> dict:
    """Validate a mapping against a schema, filling defaults. Nested schemas
    are plain dicts of Fields."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key or "(top level)", f"expected a mapping, got {_type_name(raw)}",
                          "write it as key: value lines")
    for k in raw:
        if _join(key, str(k)) in REMOVED_KEYS:
            raise ConfigError(_join(key, str(k)), "is no longer used", REMOVED_KEYS[_join(key, str(k))])
        if k not in schema:
            raise ConfigError(_join(key, str(k)), "unknown key", _suggest(str(k), schema))
    out = {}
    for name, spec in schema.items():
        sub = _join(key, name)
        if isinstance(spec, Field):
            out[name] = spec.parse(raw[name], sub) if name in raw else _copy_default(spec.default)
        else:
            out[name] = parse_section(raw.get(name), spec, sub)
    return out


def _copy_default(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _suggest(bad: str, valid) -> str:
    names = sorted(valid)
    close = difflib.get_close_matches(bad, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}valid keys here: {', '.join(names)}"


# ---------------------------------------------------------------- the schema

def _check_writable_file(path: str, key: str) -> str:
    parent = os.path.dirname(os.path.abspath(path)) or "."
    probe = parent
    while not os.path.exists(probe):  # the exporter creates missing directories
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write {path} ({probe} is not a writable directory)",
                          "choose a path in a writable directory")
    if os.path.isdir(path):
        raise ConfigError(key, f"{path} is a directory", "give a file path, e.g. /var/lib/otelbpf/telemetry.jsonl")
    return path


def _check_existing_file(path: str, key: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(key, f"{path} does not exist", "give the path of an existing file, or remove the key")
    return path


def _check_header_secrets(headers: dict, key: str) -> dict:
    for name, value in headers.items():
        if isinstance(value, str) and value.startswith("file:") and not os.path.isfile(value[5:]):
            raise ConfigError(f"{key}.{name}", f"secret file {value[5:]} does not exist",
                              "point it at a readable file (its content is the header value)")
    return headers


def _check_endpoint(url: str, key: str) -> str:
    if not re.match(r"^(https?://)?[\w.\-\[\]:]+(:\d+)?(/.*)?$", url):
        raise ConfigError(key, f"{url!r} is not an endpoint URL", "write it like http://127.0.0.1:4317")
    return url


OTLP_SCHEMA = {
    "endpoint": Field("str", None, "Collector URL; unset uses OTEL_EXPORTER_OTLP_ENDPOINT, then the SDK default. "
                      "For http/protobuf a bare host:port gets /v1/<signal> appended.", check=_check_endpoint),
    "protocol": Field("str", None, "grpc or http/protobuf; unset uses OTEL_EXPORTER_OTLP_PROTOCOL, then grpc",
                      choices=("grpc", "http/protobuf")),
    "headers": Field("str_map", {}, "extra request headers (e.g. authorization), merged over "
                     "OTEL_EXPORTER_OTLP_HEADERS; a value \"file:/path\" or \"env:NAME\" is read from there",
                     check=lambda v, key: _check_header_secrets(v, key)),
    "insecure": Field("bool", None, "gRPC without TLS; unset follows the endpoint scheme and OTEL_EXPORTER_OTLP_INSECURE"),
    "certificate": Field("str", None, "CA bundle for TLS", check=_check_existing_file),
    "client_certificate": Field("str", None, "client certificate (PEM) for mutual TLS", check=_check_existing_file),
    "client_key": Field("str", None, "client private key (PEM) for mutual TLS", check=_check_existing_file),
    "compression": Field("str", None, "none or gzip", choices=("none", "gzip")),
    "timeout": Field("duration", 10.0, "per-export timeout"),
    "max_points_per_request": Field("int", 1000, "metric data points per export request at most; more are split "
                                    "across requests (less memory while encoding, and under the 4 MiB a gRPC "
                                    "receiver accepts by default)", minimum=1),
    "histogram": Field("str", "exponential", "exponential (exact kernel log2 buckets) or explicit (for backends "
                       "without exponential histograms)", choices=("exponential", "explicit")),
}

FILE_SCHEMA = {
    "path": Field("str", "/var/lib/otelbpf/telemetry.jsonl", "one OTLP/JSON request per line",
                  check=_check_writable_file),
    "histogram": OTLP_SCHEMA["histogram"],
}

CONSOLE_SCHEMA = {
    "top": Field("int", 15, "rows shown per metric", minimum=1),
    "clear": Field("bool", None, "redraw in place; unset: when stdout is a terminal"),
}

def _check_listen(v: str, key: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, f"{v!r} is not host:port", "write it like 127.0.0.1:9464 (port 0: any free port)")
    return v


PROMETHEUS_SCHEMA = {
    "listen": Field("str", None, "host:port of its own /metrics server; unset: /metrics on the health server "
                    "(the top-level health: address)", check=_check_listen),
}

EXPORTER_SCHEMAS = {"otlp": OTLP_SCHEMA, "file": FILE_SCHEMA, "console": CONSOLE_SCHEMA,
                    "prometheus": PROMETHEUS_SCHEMA}

TOP_SCHEMA = {
    "interval": Field("duration", 10.0, "collection and export period (at least 100ms)", minimum=0.1),
    "resource": Field("str_map", {}, "extra resource attributes (OTEL_RESOURCE_ATTRIBUTES also applies)"),
    "log_level": Field("str", "info", "agent log level", choices=("debug", "info", "warning", "error")),
    "export_queue": Field("int", 64, "batches buffered per exporter and signal while a backend is slow or "
                          "down; the oldest are dropped and counted beyond it", minimum=1),
    "export_queue_memory": Field("bytes", 64 << 20, "memory (estimated) buffered per exporter and signal; "
                                 "the oldest batches are dropped and counted beyond it", minimum=64 << 10),
    "export_retry_max": Field("duration", 300.0, "how long one batch is retried before it is dropped and "
                              "counted (a backend that rejects it for good must not stall the rest)"),
    "health": Field("str", "127.0.0.1:9464", "host:port for /healthz, /metrics (the agent's own telemetry; "
                    "every metric with the prometheus exporter) and /records (for otelbpf top); "
                    "empty to disable",
                    check=lambda v, key: _check_listen(v, key) if v else v),
    "lock_file": Field("str", "/run/otelbpf/otelbpf.lock", "one agent per host: a second `otelbpf run` with "
                       "the same lock file exits with a clear message"),
    "process": {
        "command_line": Field("bool", False, "add process.command_line to records that name a process "
                              "(off: arguments can hold secrets)"),
    },
    "kubernetes": {
        "enabled": Field("str", "auto", "pod names from the Kubernetes API: auto (in a cluster), on, off",
                         choices=("auto", "on", "off")),
        "api": Field("str", None, "API server URL; unset: in-cluster (service account)"),
        "node": Field("str", None, "this node's name; unset: $K8S_NODE_NAME, then the host name"),
    },
    "kernel": {
        "btf": Field("str", None, "BTF file for CO-RE when the kernel has no /sys/kernel/btf/vmlinux",
                     check=_check_existing_file),
        "tracefs": Field("str", "/sys/kernel/tracing", "where tracefs is (mounted there if it is not)"),
    },
}

PROBE_COMMON = {"enabled": Field("bool", True, "run this probe")}


@dataclass
class AgentConfig:
    interval: float
    resource: dict
    log_level: str
    export_queue: int
    export_queue_memory: int
    export_retry_max: float
    lock_file: str
    health: str
    kernel: dict
    kubernetes: dict
    exporters: dict  # name -> settings; only the enabled exporters appear
    probes: dict     # name -> settings (enabled included)
    process: dict = field(default_factory=lambda: {"command_line": False})
    source: str = "(embedded default)"
    raw: dict = field(default_factory=dict, repr=False)


def load_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} not found", "give the path of an existing YAML file")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"cannot read {path}: {e}", "check the path and its permissions")
    return load_text(text, path)


def load_text(text: str, origin: str = "<config>") -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{origin}{where}: invalid YAML ({problem})", "fix the YAML syntax there")
    except RecursionError:
        raise ConfigError("", f"{origin}: YAML nested too deeply", "flatten the document")


def build(raw: Any, probe_schemas: Mapping[str, Schema], source: str = "(embedded default)",
          env: Mapping[str, str] = os.environ) -> AgentConfig:
    """Validate a parsed YAML document. probe_schemas: installed probe name ->
    its keys (without `enabled`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("(top level)", f"expected a mapping, got {_type_name(raw)}",
                          "start the file with keys such as interval:, exporters:, probes:")
    top_raw = {k: v for k, v in raw.items() if k not in ("exporters", "probes")}
    for k in raw:
        if not isinstance(k, str):
            raise ConfigError(str(k), "keys must be strings", "quote the key")
    unknown = [k for k in top_raw if k not in TOP_SCHEMA]
    if unknown:
        raise ConfigError(unknown[0], "unknown key", _suggest(unknown[0], list(TOP_SCHEMA) + ["exporters", "probes"]))
    top = parse_section(top_raw, TOP_SCHEMA, "")

    exporters = _build_exporters(raw.get("exporters", _MISSING), env)
    prom = exporters.get("prometheus")
    if prom is not None and not prom["listen"] and not top["health"]:
        raise ConfigError("exporters.prometheus.listen", "health: is empty, so there is no server for /metrics",
                          "give the exporter its own listen: 127.0.0.1:9464, or set health:")
    if prom is not None and prom["listen"] and prom["listen"] == top["health"]:
        raise ConfigError("exporters.prometheus.listen", "the same address as health:",
                          "leave listen unset to serve /metrics on the health server")
    probes = _build_probes(raw.get("probes", _MISSING), probe_schemas)
    return AgentConfig(interval=top["interval"], resource=top["resource"], log_level=top["log_level"],
                       export_queue=top["export_queue"], export_queue_memory=top["export_queue_memory"],
                       export_retry_max=top["export_retry_max"],
                       lock_file=top["lock_file"], health=top["health"],
                       kernel=top["kernel"], kubernetes=top["kubernetes"],
                       exporters=exporters, probes=probes, process=top["process"], source=source,
                       raw=dict(raw))


_MISSING = object()


def _build_exporters(raw: Any, env: Mapping[str, str]) -> dict:
    if raw is _MISSING:
        # Embedded default: the live view; plus OTLP when the standard
        # environment names a collector, as any OpenTelemetry SDK would.
        raw = {"console": {}}
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
            raw["otlp"] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("exporters", f"expected a mapping, got {_type_name(raw)}",
                          "write e.g. exporters: {console: {}}")
    out = {}
    for name, sub in raw.items():
        if name not in EXPORTER_SCHEMAS:
            raise ConfigError(f"exporters.{name}", "unknown exporter", _suggest(str(name), EXPORTER_SCHEMAS))
        out[name] = parse_section(sub, EXPORTER_SCHEMAS[name], f"exporters.{name}")
    otlp = out.get("otlp")
    if otlp and bool(otlp["client_certificate"]) != bool(otlp["client_key"]):
        missing = "client_key" if otlp["client_certificate"] else "client_certificate"
        raise ConfigError(f"exporters.otlp.{missing}", "mutual TLS needs both a client certificate and its key",
                          f"set {missing} too, or remove the other")
    return out


def _build_probes(raw: Any, probe_schemas: Mapping[str, Schema]) -> dict:
    if raw is _MISSING:
        raw = {name: {} for name in probe_schemas}  # every installed probe
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("probes", f"expected a mapping, got {_type_name(raw)}",
                          "write e.g. probes: {syscall_latency: {enabled: true}}")
    out = {}
    for name, sub in raw.items():
        if name not in probe_schemas:
            installed = ", ".join(sorted(probe_schemas)) or "none"
            close = difflib.get_close_matches(str(name), list(probe_schemas), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"probes.{name}", "unknown probe",
                              f"{hint}installed probes: {installed} (see `otelbpf probes`)")
        schema = dict(PROBE_COMMON)
        schema.update(probe_schemas[name])
        out[name] = parse_section(sub, schema, f"probes.{name}")
    return out
