"""OTLP/JSON lines: one ExportMetricsServiceRequest / ExportTraceServiceRequest /
ExportProfilesServiceRequest per line, in protobuf's JSON mapping, so
opentelemetry-proto's json_format.Parse reads every line back."""
from __future__ import annotations

import os
import threading

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from . import metrics_data
from .profiles_otlp import build_request
from .span_encoder import ENCODER


class FileExporter:
    name = "file"
    signal_lanes = True  # one line per signal; writes are serialised by _lock

    def __init__(self, cfg: dict):
        self.path = cfg["path"]
        self.form = cfg["histogram"]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def _write(self, msg) -> None:
        line = json_format.MessageToJson(msg, indent=None)
        with self._lock:
            self._f.write(line.replace("\n", " ") + "\n")
            self._f.flush()

    def export(self, batch) -> bool:
        if any(batch.metrics.values()):
            data = metrics_data.build(batch.resource, batch.metrics, batch.time_ns, self.form)
            self._write(encode_metrics(data))
        if batch.spans:
            self._write(ENCODER.encode(batch.spans))
        if any(batch.profiles.values()):
            self._write(build_request(batch.resource, batch.profiles))
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._f.close()
