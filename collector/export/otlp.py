"""OTLP through the OpenTelemetry SDK's own exporters (gRPC or HTTP), so
OTEL_EXPORTER_OTLP_* variables, TLS, headers, compression and retries behave
as in any SDK. Explicit config keys win over the environment."""
from __future__ import annotations

import inspect
import logging
import os
from urllib.parse import urlparse

from opentelemetry.sdk.metrics.export import MetricExportResult
from opentelemetry.sdk.trace.export import SpanExportResult

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans

from . import metrics_data
from .profiles_otlp import build_request
from .span_encoder import ENCODER

log = logging.getLogger("otelbpf.export.otlp")


def _protocol(cfg: dict, signal: str) -> str:
    return (cfg.get("protocol") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")


def secret_value(value: str) -> str:
    """Header values may name their secret instead of holding it:
    "file:/path" reads the file (trailing newline dropped), "env:NAME" the
    environment. Values are never logged."""
    if value.startswith("file:"):
        with open(value[5:], encoding="utf-8") as f:
            return f.read().rstrip("\n")
    if value.startswith("env:"):
        return os.environ.get(value[4:], "")
    return value


def _headers(cfg: dict):
    if not cfg.get("headers"):
        return None  # the SDK reads OTEL_EXPORTER_OTLP_HEADERS itself
    from opentelemetry.util.re import parse_env_headers
    merged = parse_env_headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""), liberal=True)
    merged.update({k.lower(): secret_value(str(v)) for k, v in cfg["headers"].items()})
    return merged


def _read(path):
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def grpc_credentials(cfg: dict):
    """TLS for gRPC: CA bundle, and a client certificate for mutual TLS."""
    if not (cfg.get("certificate") or cfg.get("client_certificate")):
        return None
    from grpc import ssl_channel_credentials
    return ssl_channel_credentials(root_certificates=_read(cfg.get("certificate")),
                                   private_key=_read(cfg.get("client_key")),
                                   certificate_chain=_read(cfg.get("client_certificate")))


def _http_endpoint(endpoint, path: str):
    """A config endpoint without a path gets the signal path, as the SDK does
    for OTEL_EXPORTER_OTLP_ENDPOINT."""
    if not endpoint:
        return None
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    if urlparse(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + path
    return endpoint


def _grpc_kwargs(cfg: dict) -> dict:
    kw = {"endpoint": cfg.get("endpoint"), "insecure": cfg.get("insecure"), "headers": _headers(cfg),
          "timeout": cfg["timeout"]}
    if cfg.get("compression"):
        from grpc import Compression
        kw["compression"] = Compression.Gzip if cfg["compression"] == "gzip" else Compression.NoCompression
    creds = grpc_credentials(cfg)
    if creds is not None:
        kw["credentials"] = creds
    return kw


def _http_kwargs(cfg: dict, path: str) -> dict:
    kw = {"endpoint": _http_endpoint(cfg.get("endpoint"), path), "headers": _headers(cfg),
          "timeout": cfg["timeout"], "certificate_file": cfg.get("certificate"),
          "client_certificate_file": cfg.get("client_certificate"), "client_key_file": cfg.get("client_key")}
    if cfg.get("compression"):
        from opentelemetry.exporter.otlp.proto.http import Compression
        kw["compression"] = Compression.Gzip if cfg["compression"] == "gzip" else Compression.NoCompression
    return kw


def make_metric_exporter(cfg: dict):
    if _protocol(cfg, "metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        kw = _grpc_kwargs(cfg)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        kw = _http_kwargs(cfg, "/v1/metrics")
    # Split big collections (2,000 flows are ~16k points): each request is
    # encoded on its own, so the protobuf copy of a collection never exists
    # whole. The HTTP exporter took the argument later than the gRPC one.
    if "max_export_batch_size" in inspect.signature(OTLPMetricExporter.__init__).parameters:
        kw["max_export_batch_size"] = cfg["max_points_per_request"]
    return OTLPMetricExporter(**kw)


def make_span_exporter(cfg: dict):
    """The SDK's span exporter, encoding with span_encoder.ENCODER: the same
    request as the SDK's encode_spans(), at a quarter of its CPU."""
    if _protocol(cfg, "traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        class GrpcSpanExporter(OTLPSpanExporter):
            def _translate_data(self, data):
                return ENCODER.encode(data)
        return GrpcSpanExporter(**_grpc_kwargs(cfg))
    from opentelemetry.exporter.otlp.proto.http import trace_exporter as http_traces
    # the HTTP exporter calls its module's encode_spans() (no method to
    # override): that name is pointed at ours, only if it is still the SDK's
    if http_traces.encode_spans is sdk_encode_spans:
        http_traces.encode_spans = ENCODER.encode
    elif http_traces.encode_spans != ENCODER.encode:   # (a bound method: each access makes a new object)
        log.warning("OTLP/HTTP spans: this SDK's exporter encodes differently; using its own encoder")
    return http_traces.OTLPSpanExporter(**_http_kwargs(cfg, "/v1/traces"))


class ProfilesExporter:
    """OTLP profiles (v1development): the SDK has no exporter for this signal
    yet, so this sends ExportProfilesServiceRequest itself, over gRPC to the
    ProfilesService or over HTTP to /v1development/profiles."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.protocol = _protocol(cfg, "profiles")
        self.timeout = cfg["timeout"]
        headers = _headers(cfg) or {}
        if not cfg.get("headers"):
            from opentelemetry.util.re import parse_env_headers
            headers = parse_env_headers(os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""), liberal=True)
        self.headers = headers
        endpoint = cfg.get("endpoint") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if self.protocol == "grpc":
            import grpc
            from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc
            url = urlparse(endpoint if endpoint and "://" in endpoint else f"http://{endpoint or 'localhost:4317'}")
            target = url.netloc or url.path
            insecure = cfg.get("insecure")
            if insecure is None:
                insecure = url.scheme == "http"
            if insecure:
                self._channel = grpc.insecure_channel(target)
            else:
                creds = grpc_credentials(cfg) or grpc.ssl_channel_credentials()
                self._channel = grpc.secure_channel(target, creds)
            self._stub = profiles_service_pb2_grpc.ProfilesServiceStub(self._channel)
        else:
            import requests
            self._session = requests.Session()
            self.url = _http_endpoint(endpoint or "http://localhost:4318", "/v1development/profiles")
            if endpoint and urlparse(self.url).path.endswith("/v1/metrics"):
                self.url = self.url[: -len("/v1/metrics")] + "/v1development/profiles"

    def export(self, request) -> bool:
        try:
            if self.protocol == "grpc":
                self._stub.Export(request, timeout=self.timeout, metadata=list(self.headers.items()) or None)
                return True
            cert = ((self.cfg["client_certificate"], self.cfg["client_key"])
                    if self.cfg.get("client_certificate") else None)
            resp = self._session.post(self.url, data=request.SerializeToString(), timeout=self.timeout,
                                      headers={"Content-Type": "application/x-protobuf", **self.headers},
                                      verify=self.cfg.get("certificate") or True, cert=cert)
            if resp.ok:
                return True
            log.warning("profiles export to %s: HTTP %d", self.url, resp.status_code)
        except Exception as e:
            log.warning("profiles export failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False

    def shutdown(self) -> None:
        if self.protocol == "grpc":
            self._channel.close()
        else:
            self._session.close()


class OtlpExporter:
    name = "otlp"
    signal_lanes = True  # each signal goes out on its own; see export.worker

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.form = cfg["histogram"]
        self._metrics = make_metric_exporter(cfg)
        self._spans = None     # created on the first span batch
        self._profiles = None  # created on the first profile batch

    def export(self, batch) -> bool:
        ok = True
        if any(batch.metrics.values()):
            data = metrics_data.build(batch.resource, batch.metrics, batch.time_ns, self.form)
            ok &= self._metrics.export(data, timeout_millis=self.cfg["timeout"] * 1000) == MetricExportResult.SUCCESS
        if batch.spans:
            if self._spans is None:
                self._spans = make_span_exporter(self.cfg)
            ok &= self._spans.export(batch.spans) == SpanExportResult.SUCCESS
        if any(batch.profiles.values()):
            if self._profiles is None:
                self._profiles = ProfilesExporter(self.cfg)
            ok &= self._profiles.export(build_request(batch.resource, batch.profiles))
        return ok

    def shutdown(self) -> None:
        self._metrics.shutdown()
        if self._spans is not None:
            self._spans.shutdown()
        if self._profiles is not None:
            self._profiles.shutdown()
