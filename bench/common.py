"""Shared by the benchmarks: paths, and building their C workloads."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build(name: str, libs=()) -> str:
    """Compile bench/<name>.c into bench/bin/<name> (-O2, linked with libs) and return its path."""
    out = ROOT / "bench" / "bin" / name
    out.parent.mkdir(exist_ok=True)
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / f"{name}.c"), *libs], check=True)
    return str(out)


def start_otlp_sink(keep_metrics: bool = False):
    """An OTLP/HTTP endpoint on loopback that reads every request and answers
    200: the agent pays the real protobuf export cost. It counts requests
    and, with keep_metrics, keeps the decoded metrics requests.
    Returns (server, store); store has endpoint, received, metrics, lock."""
    import gzip
    import threading
    import types
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    store = types.SimpleNamespace(received=0, metrics=[], lock=threading.Lock())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if keep_metrics and self.path == "/v1/metrics":
                from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = metrics_service_pb2.ExportMetricsServiceRequest()
                req.ParseFromString(body)
                with store.lock:
                    store.metrics.append(req)
            with store.lock:
                store.received += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    return server, store


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def latest(sink, name: str, **match) -> dict:
    """series attributes -> latest cumulative value, for metric `name`."""
    want = {k.replace("__", "."): v for k, v in match.items()}
    out: dict = {}
    with sink.lock:
        reqs = list(sink.metrics)
    for req in reqs:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != name:
                        continue
                    kind = m.WhichOneof("data")
                    for dp in getattr(m, kind).data_points:
                        a = _attrs(dp.attributes)
                        if all(a.get(k) == v for k, v in want.items()):
                            key = tuple(sorted(a.items()))
                            val = dp.count if kind in ("histogram", "exponential_histogram") else \
                                (dp.as_int or dp.as_double)
                            if key not in out or dp.time_unix_nano >= out[key][0]:
                                out[key] = (dp.time_unix_nano, val)
    return {k: v for k, (_t, v) in out.items()}


def total(sink, name: str, **match) -> int:
    return int(sum(latest(sink, name, **match).values()))


# Debian's nginx for the HTTP benchmarks: `return 200` on a plain and a TLS
# port, an access log of "port bytes_sent" per request (the ground truth).
NGINX_CONF = """
user root;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  log_format sent '$server_port $bytes_sent';
  access_log {d}/access.log sent;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{ return 200 "hello\\n"; }}
  }}
}}
"""


def start_nginx(d: str) -> tuple:
    """Debian's nginx with NGINX_CONF in directory d (a throwaway
    certificate for its TLS port): (plain port, TLS port). Stop it with
    `nginx -c d/nginx.conf -s stop`."""
    port, tls_port = free_port(), free_port()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/key.pem", "-out",
                    f"{d}/cert.pem", "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(NGINX_CONF.format(d=d, port=port, tls_port=tls_port))
    subprocess.run(["nginx", "-c", f"{d}/nginx.conf"], check=True)
    return port, tls_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answered(path: str, port: int) -> int:
    """Requests nginx answered on port: it also logs requests whose client
    hung up before the response could be written (0 bytes sent)."""
    n = 0
    with open(path) as f:
        for line in f:
            p, sent = line.split()
            n += p == str(port) and int(sent) > 0
    return n
