"""A real OTLP receiver for tests: gRPC (MetricsService, TraceService,
ProfilesService) and HTTP (/v1/metrics, /v1/traces, /v1development/profiles,
protobuf bodies), keeping every request.

It speaks the wire protocol with opentelemetry-proto's own stubs, so what the
agent sends is decoded exactly as a collector would decode it.
"""
from __future__ import annotations

import collections
import gzip
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as ps
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as ps_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc


class Received:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list = []   # ExportMetricsServiceRequest
        self.traces: list = []    # ExportTraceServiceRequest
        self.profiles: list = []  # ExportProfilesServiceRequest
        self.headers: list = []   # request metadata/headers, one dict per request

    def add(self, kind: str, req, headers: dict) -> None:
        with self.lock:
            getattr(self, kind).append(req)
            self.headers.append(headers)


class _Metrics(ms_grpc.MetricsServiceServicer):
    def __init__(self, rx: Received):
        self.rx = rx

    def Export(self, request, context):
        self.rx.add("metrics", request, dict(context.invocation_metadata()))
        return ms.ExportMetricsServiceResponse()


class _Traces(ts_grpc.TraceServiceServicer):
    def __init__(self, rx: Received):
        self.rx = rx

    def Export(self, request, context):
        self.rx.add("traces", request, dict(context.invocation_metadata()))
        return ts.ExportTraceServiceResponse()


class _Profiles(ps_grpc.ProfilesServiceServicer):
    def __init__(self, rx: Received):
        self.rx = rx

    def Export(self, request, context):
        self.rx.add("profiles", request, dict(context.invocation_metadata()))
        return ps.ExportProfilesServiceResponse()


class GrpcReceiver:
    def __init__(self, port: int = 0, credentials=None):
        """credentials: grpc.ssl_server_credentials(...) for TLS, else plaintext."""
        self.rx = Received()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        ms_grpc.add_MetricsServiceServicer_to_server(_Metrics(self.rx), self.server)
        ts_grpc.add_TraceServiceServicer_to_server(_Traces(self.rx), self.server)
        ps_grpc.add_ProfilesServiceServicer_to_server(_Profiles(self.rx), self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
            self.endpoint = f"http://127.0.0.1:{self.port}"
        else:
            self.port = self.server.add_secure_port(f"127.0.0.1:{port}", credentials)
            self.endpoint = f"https://localhost:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=0)


class HttpReceiver:
    _ROUTES = {"/v1/metrics": ("metrics", ms.ExportMetricsServiceRequest, ms.ExportMetricsServiceResponse),
               "/v1/traces": ("traces", ts.ExportTraceServiceRequest, ts.ExportTraceServiceResponse),
               "/v1development/profiles": ("profiles", ps.ExportProfilesServiceRequest,
                                           ps.ExportProfilesServiceResponse)}

    def __init__(self):
        """script: (status, headers, delay s) answers given to the next
        requests, in order, before the normal 200s (faults on demand).
        reject: (kind, request) -> an error status for a request this backend
        refuses for good (a poison batch), or None to take it."""
        self.rx = Received()
        self.script: "collections.deque" = collections.deque()
        self.reject = None
        self.faults_served: list = []
        rx, routes, receiver = self.rx, self._ROUTES, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    status, headers, delay = receiver.script.popleft()
                except IndexError:
                    status = None
                if status is not None:
                    receiver.faults_served.append((self.path, status))
                    time.sleep(delay)
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                route = routes.get(self.path)
                if route is None or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                kind, req_cls, resp_cls = route
                req = req_cls()
                req.ParseFromString(body)
                refused = receiver.reject(kind, req) if receiver.reject else None
                if refused:
                    receiver.faults_served.append((self.path, refused))
                    self.send_response(refused)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rx.add(kind, req, {k.lower(): v for k, v in self.headers.items()})
                out = resp_cls().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
