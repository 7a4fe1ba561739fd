"""/healthz, /metrics and /records on a local port: liveness for
systemd/Kubernetes probes; for a scraper the agent's own telemetry (even
when no backend is configured), or every metric once the prometheus
exporter serves here, with that exporter's naming and encoders
(export/prometheus.py); and the latest collection as JSON
(collector/top/snapshot.py), what `otelbpf top` shows."""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry

from .export.prometheus import MetricsSnapshot, encode, parse_listen
from .selftelemetry import DROPPED, OVERFLOW

log = logging.getLogger("otelbpf.health")
_SELF = {DROPPED.name, OVERFLOW.name}


class HealthServer:
    def __init__(self, listen: str, interval: float):
        host, port = parse_listen(listen)
        self.interval = interval
        self.started = time.monotonic()
        self.last_tick = None
        self.self_metrics = MetricsSnapshot()
        self._self_registry = CollectorRegistry()
        self._self_registry.register(self.self_metrics)
        self._registry = self._self_registry   # what /metrics serves
        self._lock = threading.Lock()          # /records' cache, built by request threads
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/healthz":
                    ok, why = server.healthy()
                    self._reply(200 if ok else 503, why + "\n", "text/plain")
                elif self.path == "/metrics":
                    body, ctype = encode(server._registry, self.headers.get("Accept"))
                    self._reply(200, body, ctype)
                elif self.path == "/records":
                    self._reply(200, server.records_json(), "application/json")
                else:
                    self._reply(404, "not found\n", "text/plain")

            def _reply(self, code, body, ctype):
                data = body if isinstance(body, bytes) else body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up (a scrape timeout): nothing to answer

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = "%s:%d" % self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)
        self._thread.start()

    def healthy(self) -> tuple:
        now = time.monotonic()
        grace = max(3 * self.interval, 30.0)
        if self.last_tick is None:
            if now - self.started < grace:
                return True, "ok: starting"
            return False, "no collection since start"
        if now - self.last_tick > grace:
            return False, f"last collection {now - self.last_tick:.0f}s ago"
        return True, "ok"

    def update(self, batch) -> None:
        """After each tick: keep the agent's own series for /metrics."""
        keep = {scope: (list(records) if scope == "otelbpf.agent" else
                        [r for r in records if r.instrument.name in _SELF])
                for scope, records in batch.metrics.items()}
        self.self_metrics.update(batch.resource, keep, batch.time_ns)
        self.last_tick = time.monotonic()
        self._latest_batch = batch

    # /records: made on request (once per batch), so an agent nobody watches pays nothing
    _latest_batch = None
    _records_cache = (None, "")

    def records_json(self) -> str:
        from .top.snapshot import empty, snapshot
        batch = self._latest_batch
        if batch is None:
            return json.dumps(empty(self.interval))
        with self._lock:
            if self._records_cache[0] is not batch:
                self._records_cache = (batch, json.dumps(snapshot(batch, self.interval), separators=(",", ":")))
            return self._records_cache[1]

    def serve_metrics(self, registry) -> None:
        """/metrics serves this registry (the prometheus exporter's), or with
        None the agent's own telemetry again."""
        self._registry = registry if registry is not None else self._self_registry

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
