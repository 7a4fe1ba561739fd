"""HTTP/2 exchanges (probes/l7/http2.py) as OpenTelemetry metrics and spans.

Plain HTTP/2 requests join HTTP/1's instruments (http.server.request.duration,
http.client.request.duration) with network.protocol.version "2". gRPC calls
(content-type application/grpc*) follow the RPC semantic conventions as of
v1.45 (RPC stable): rpc.server.call.duration / rpc.client.call.duration in
seconds, rpc.system.name "grpc", rpc.method "package.Service/Method",
rpc.status_code the status name, error.type set when the call failed (per
side: a server counts only the codes that are its own fault as errors).
"""
from __future__ import annotations

from typing import Callable, Optional

from collector.records import Instrument

SERVER, CLIENT = 1, 2

RPC_SERVER_DURATION = Instrument("rpc.server.call.duration", "s",
                                 "Duration of gRPC calls served, request headers read to the end of the "
                                 "response stream written, timed in the kernel")
RPC_CLIENT_DURATION = Instrument("rpc.client.call.duration", "s",
                                 "Duration of gRPC calls made, request headers written to the end of the "
                                 "response stream read, timed in the kernel")

GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
              "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# A server span is an error only for these (the conventions' gRPC table); a
# client's is for every code but OK.
SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                           "DATA_LOSS"})
# gRPC's own mapping of an HTTP status that came without grpc-status
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
DEADLINE_SLACK = 0.01          # a reset this close to grpc-timeout (share of it, plus 1 ms) is the deadline


def grpc_timeout_s(value: Optional[str]) -> Optional[float]:
    """grpc-timeout ("200m", "1S", ...) in seconds, or None."""
    if not value or len(value) > 9 or value[-1] not in _TIMEOUT_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


def grpc_code(ex) -> Optional[str]:
    """The call's status name: its grpc-status, else what ended it; None
    when its trailers could not be decoded (a connection joined mid-way)."""
    if ex.grpc_status is not None:
        return GRPC_CODES[ex.grpc_status] if 0 <= ex.grpc_status < len(GRPC_CODES) else "UNKNOWN"
    if ex.outcome == "reset":
        timeout = grpc_timeout_s(ex.grpc_timeout)
        took = (ex.end_ns - ex.start_ns) / 1e9
        if timeout is not None and took >= timeout * (1 - DEADLINE_SLACK) - 1e-3:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    if ex.outcome in ("goaway", "unanswered"):
        return "UNAVAILABLE"
    if ex.status is not None and ex.status != 200:
        return GRPC_CODES[_HTTP_TO_GRPC.get(ex.status, 2)]
    if ex.partial:
        return None
    return "UNKNOWN"           # a 200 response stream that ended without trailers


def grpc_failed(code: Optional[str], role: int) -> bool:
    return code is not None and code != "OK" and (role == CLIENT or code in SERVER_FAULTS)


def rpc_method(ex) -> str:
    """"package.Service/Method"; "_OTHER" for a method the server said it
    does not have (UNIMPLEMENTED) or a path that is not a gRPC one: names
    callers make up must not become series."""
    sm = ex.grpc_method()
    if sm is None or ex.grpc_status == 12:
        return "_OTHER"
    return f"{sm[0]}/{sm[1]}"


def http_method(ex) -> str:
    m = ex.method
    return m if m in ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE") else "_OTHER"


def route_path(ex) -> Optional[str]:
    """The :path without its query."""
    return ex.path.split("?", 1)[0].split("#", 1)[0] if ex.path else None


def metric_attributes(ex, route: Callable[[Optional[str]], str], exe_name: str, server_addr: str) -> tuple:
    """(instrument kind, attributes) of one exchange's series: kind is "http"
    or "rpc"; server_addr is the peer's address text (client side)."""
    role = ex.role
    port = ex.lport if role == SERVER else ex.rport
    if ex.is_grpc:
        code = grpc_code(ex)
        attrs = {"rpc.system.name": "grpc", "rpc.method": rpc_method(ex), "process.executable.name": exe_name}
        if code is not None:
            attrs["rpc.status_code"] = code
        if role == CLIENT:
            attrs["server.address"] = server_addr
            attrs["server.port"] = port
        if grpc_failed(code, role):
            attrs["error.type"] = code
    else:
        status = ex.status or 0
        attrs = {"http.request.method": http_method(ex), "http.response.status_code": status,
                 "url.scheme": "https" if ex.tls else "http", "server.port": port,
                 "network.protocol.version": "2", "process.executable.name": exe_name}
        if role == SERVER:
            attrs["http.route"] = route(route_path(ex))
            if status >= 500:
                attrs["error.type"] = str(status)
        else:
            attrs["server.address"] = server_addr
            if status >= 400:
                attrs["error.type"] = str(status)
    if ex.partial:
        attrs["otelbpf.partial"] = True     # joined mid-way: some fields were not decodable
    return ("rpc" if ex.is_grpc else "http"), attrs


def span_fields(ex, route: Callable[[Optional[str]], str], peer_addr: str) -> tuple:
    """(name, kind, attributes, error) of one exchange's span."""
    role = ex.role
    kind = "server" if role == SERVER else "client"
    attrs = {"network.peer.address": peer_addr, "network.peer.port": ex.rport, "process.pid": ex.tgid}
    if ex.user_agent:
        attrs["user_agent.original"] = ex.user_agent
    if ex.partial:
        attrs["otelbpf.partial"] = True
    authority = (ex.authority or "").rsplit(":", 1)[0] if ex.authority and not ex.authority.endswith("]") \
        else ex.authority
    if ex.is_grpc:
        code = grpc_code(ex)
        method = rpc_method(ex)
        attrs.update({"rpc.system.name": "grpc", "rpc.method": method})
        if code is not None:
            attrs["rpc.status_code"] = code
        if method == "_OTHER" and ex.path:
            attrs["rpc.method_original"] = ex.path.lstrip("/")
        if ex.grpc_message:
            attrs["otelbpf.grpc.message"] = ex.grpc_message[:256]
        if authority:
            attrs["server.address"] = authority
        if role == CLIENT:
            attrs["server.port"] = ex.rport
        error = grpc_failed(code, role)
        if error:
            attrs["error.type"] = code
        return (method if method != "_OTHER" else "grpc"), kind, attrs, error
    method = http_method(ex)
    status = ex.status or 0
    scheme = "https" if ex.tls else "http"
    attrs.update({"http.request.method": method, "http.response.status_code": status, "url.scheme": scheme,
                  "network.protocol.name": "http", "network.protocol.version": "2"})
    if role == SERVER:
        path = route_path(ex)
        r = route(path)
        attrs.update({"url.path": path or "", "http.route": r, "server.port": ex.lport,
                      "client.address": peer_addr})
        if authority:
            attrs["server.address"] = authority
        name, error = f"{method} {r}", status >= 500 or not status
    else:
        attrs.update({"server.address": authority or peer_addr, "server.port": ex.rport,
                      "url.full": f"{scheme}://{ex.authority or peer_addr}{ex.path or ''}"})
        name, error = method, status >= 400 or not status
    if error:
        attrs["error.type"] = str(status) if status else ex.outcome
    return name, kind, attrs, error
