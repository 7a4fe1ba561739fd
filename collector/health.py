"""/healthz and /metrics (Prometheus text) on a local port: liveness for
systemd/Kubernetes probes, and the agent's own telemetry for a scraper even
when no OTLP backend is configured. /records: the latest collection as JSON
(collector/top/snapshot.py), what `otelbpf top` shows."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .records import Counter, Gauge
from .selftelemetry import DROPPED, OVERFLOW

log = logging.getLogger("otelbpf.health")
_SELF = {DROPPED.name, OVERFLOW.name}


def prom_name(name: str, counter: bool) -> str:
    base = re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return base + "_total" if counter and not base.endswith("_total") else base


def _label_value(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(records) -> str:
    """Self-telemetry records as Prometheus text exposition format."""
    families: dict = {}
    for r in records:
        if not isinstance(r, (Counter, Gauge)):
            continue
        counter = isinstance(r, Counter)
        name = prom_name(r.instrument.name, counter)
        fam = families.setdefault(name, (r.instrument.description, "counter" if counter else "gauge", []))
        labels = ",".join(f'{re.sub(r"[^a-zA-Z0-9_]", "_", k)}="{_label_value(v)}"'
                          for k, v in sorted(r.attributes.items()))
        fam[2].append(f"{name}{{{labels}}} {r.value}" if labels else f"{name} {r.value}")
    out = []
    for name, (desc, kind, lines) in sorted(families.items()):
        out += [f"# HELP {name} {desc}", f"# TYPE {name} {kind}"] + lines
    return "\n".join(out) + "\n"


class HealthServer:
    def __init__(self, listen: str, interval: float):
        host, _, port = listen.rpartition(":")
        self.interval = interval
        self.started = time.monotonic()
        self.last_tick = None
        self._records: list = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/healthz":
                    ok, why = server.healthy()
                    self._reply(200 if ok else 503, why + "\n", "text/plain")
                elif self.path == "/metrics":
                    with server._lock:
                        body = render(server._records)
                    self._reply(200, body, "text/plain; version=0.0.4")
                elif self.path == "/records":
                    self._reply(200, server.records_json(), "application/json")
                else:
                    self._reply(404, "not found\n", "text/plain")

            def _reply(self, code, body, ctype):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
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
        keep = list(batch.metrics.get("otelbpf.agent", []))
        for scope, records in batch.metrics.items():
            if scope != "otelbpf.agent":
                keep += [r for r in records if r.instrument.name in _SELF]
        with self._lock:
            self._records = keep
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

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
