"""Real HTTP/2 and gRPC peers for the tests and benchmarks, each with its own
ground truth, each on loopback, each a process (group) of its own that is
killed on the way out, with a bound on every wait:

  nginx_h2(d)          Debian's nginx: HTTP/1.1, cleartext h2c (prior
                       knowledge) and h2 over TLS; its access log says per
                       request the protocol, method, path and status
  h2load(url, ...)     nghttp2's load generator; its summary (requests done,
                       succeeded, per status class, req/s)
  curl_h2(url, tls)    one curl request over HTTP/2; its status
  grpc_server(d)       tests/peers/grpc_peer.py server (grpcio, service
                       demo.Echo); its counts per (method, code)
  grpc_client(target)  tests/peers/grpc_peer.py client; what it sent and got
  node_h2_server(d)    tests/peers/node_h2.js server (Node's http2); counts
                       per (method, path, status)
  node_h2_client(url)  tests/peers/node_h2.js client; what it sent and got

No agent here and no pytest: tests import it (conftest puts tests/ on
sys.path) and so do the benchmarks (sys.path.insert of tests/, as for
otlp_receiver). tests/test_h2_peers.py checks each peer's ground truth
against the other side's.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Union

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "tests" / "peers"
# The interpreter of the gRPC peers: this one (the venv has grpcio: the
# `test` extra), unless OTELBPF_PEER_PYTHON names another.
PEER_PYTHON = os.environ.get("OTELBPF_PEER_PYTHON") or sys.executable
NODE = shutil.which("node") or "/usr/bin/node"

# grpc.StatusCode names -> their numbers (grpc-status on the wire)
GRPC_CODES = {name: i for i, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"))}


def random_traceparent(sampled: bool = True) -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{'01' if sampled else '00'}"


def free_ports(n: int) -> list:
    """n distinct loopback ports that were free a moment ago (all held at
    once while chosen, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float = 10.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before listening on {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
            time.sleep(0.05)


def make_cert(d: Path) -> tuple:
    """A self-signed certificate for localhost and 127.0.0.1 (both in
    subjectAltName, so grpc and node verify it against itself) in d;
    (cert.pem, key.pem). Made once per directory."""
    d = Path(d)
    cert, key = d / "cert.pem", d / "key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    return cert, key


def _start(argv: list, **kw) -> subprocess.Popen:
    """A child in a session (process group) of its own, so that stopping it
    takes everything it started along."""
    return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> Optional[int]:
    """sig to the process, up to timeout s for it to exit, then SIGKILL to
    its whole group (also when it exited: whatever it left behind)."""
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if rc is None:
        rc = proc.wait(timeout=10)
    return rc


def _ready_line(proc: subprocess.Popen, timeout: float, what: str) -> list:
    """The child's first stdout line ("ready ..."), split, within timeout s."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise RuntimeError(f"{what} not ready after {timeout}s")
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        raise RuntimeError(f"{what} did not start (exit {proc.poll()}): {line}")
    return line[1:]


def _read_dump(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dumped(proc: subprocess.Popen, path: Path, timeout: float) -> dict:
    """Ask a peer for its counts (SIGUSR2) until it answers with a newer dump
    and no call is still in its handler; the last dump after timeout s."""
    deadline = time.monotonic() + timeout
    seq = (_read_dump(path) or {}).get("seq", 0)
    doc = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited ({proc.returncode})")
        proc.send_signal(signal.SIGUSR2)
        t = time.monotonic() + 2.0
        while time.monotonic() < min(t, deadline):
            doc = _read_dump(path)
            if doc and doc["seq"] > seq:
                break
            time.sleep(0.02)
        if doc and doc["seq"] > seq:
            seq = doc["seq"]
            if doc["in_flight"] == 0:
                return doc
        time.sleep(0.05)
    if doc is None:
        raise RuntimeError(f"{proc.args[:3]} wrote no counts to {path}")
    return doc


# ------------------------------------------------------------------ nginx

# Debian's nginx 1.22 takes `http2` on `listen` (the `http2 on;` directive
# is 1.25.1+). A cleartext `listen ... http2` port speaks only h2c with prior
# knowledge (an HTTP/1.1 request there gets a PROTOCOL_ERROR GOAWAY), so
# HTTP/1.1 has a port of its own; the TLS port offers h2 and http/1.1 by ALPN.
NGINX_H2_CONF = """
user root;
daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  log_format h2 '$server_port $server_protocol $request_method $uri $status $bytes_sent $request_time '
                '$request_completion "$http_traceparent"';
  access_log {d}/access.log h2;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests {keepalive_requests};
  server {{
    listen 127.0.0.1:{h1_port};
    listen 127.0.0.1:{h2c_port} http2;
    listen 127.0.0.1:{tls_port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location = / {{ return 200 "hello\\n"; }}
    location = /missing {{ return 404; }}
    location = /boom {{ return 500; }}
    location = /big {{ alias {d}/big.bin; }}
    location /users/ {{ return 200 "user\\n"; }}
  }}
}}
"""
BIG_BYTES = 100 * 1024     # /big: several DATA frames (nginx's http2_chunk_size is 8k)

# completed: nginx's $request_completion ("OK": the whole response was
# written; a client that went away mid-response leaves it empty, though
# bytes_sent counts what nginx had queued)
LogLine = collections.namedtuple("LogLine",
                                 "port protocol method path status bytes_sent request_time completed traceparent")


def access_lines(path: Union[str, Path], port: Optional[int] = None) -> list:
    """The access log of NGINX_H2_CONF as LogLines (of port, if given)."""
    out = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        p = line.split(" ", 8)
        if len(p) != 9 or (port is not None and p[0] != str(port)):
            continue
        out.append(LogLine(int(p[0]), p[1], p[2], p[3], int(p[4]), int(p[5]), float(p[6]), p[7] == "OK",
                           p[8].strip('"')))
    return out


def access_counts(path: Union[str, Path], port: Optional[int] = None) -> collections.Counter:
    """Requests per (protocol, method, path, status) in the access log:
    protocol is nginx's $server_protocol, "HTTP/2.0" or "HTTP/1.1"."""
    return collections.Counter((ln.protocol, ln.method, ln.path, ln.status) for ln in access_lines(path, port))


class NginxH2:
    def __init__(self, d: Path, workers: int = 2, keepalive_requests: int = 100000):
        self.d = Path(d)
        self.d.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = make_cert(self.d)
        (self.d / "big.bin").write_bytes(os.urandom(BIG_BYTES))
        self.h1_port, self.h2c_port, self.tls_port = free_ports(3)
        self.log = self.d / "access.log"
        self.conf = self.d / "nginx.conf"
        self.conf.write_text(NGINX_H2_CONF.format(d=self.d, workers=workers, keepalive_requests=keepalive_requests,
                                                  h1_port=self.h1_port, h2c_port=self.h2c_port,
                                                  tls_port=self.tls_port, cert=self.cert, key=self.key))
        self.proc = _start(["nginx", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                           stderr=open(self.d / "nginx.stderr", "w"))
        try:
            for p in (self.h1_port, self.h2c_port, self.tls_port):
                wait_port(p, proc=self.proc)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}; nginx said: {(self.d / 'nginx.stderr').read_text()}"
                               f"{(self.d / 'error.log').read_text() if (self.d / 'error.log').exists() else ''}")

    @property
    def pid(self) -> int:
        """The master's; the workers are its children."""
        return self.proc.pid

    def url(self, kind: str, path: str = "/") -> str:
        """kind: "h2c" (cleartext, prior knowledge), "h2" (TLS) or "h1"."""
        return {"h2c": f"http://127.0.0.1:{self.h2c_port}", "h2": f"https://127.0.0.1:{self.tls_port}",
                "h1": f"http://127.0.0.1:{self.h1_port}"}[kind] + path

    def lines(self, port: Optional[int] = None) -> list:
        return access_lines(self.log, port)

    def counts(self, port: Optional[int] = None, expect: Optional[int] = None,
               timeout: float = 5.0) -> collections.Counter:
        """access_counts of port once the log is complete: at least `expect`
        lines (when given) and no change over 100 ms. nginx writes each line
        with write(2), unbuffered, when the request (HTTP/2: the stream) is
        finalized, which can be a moment after the client read the last
        byte; so this waits, for at most timeout s."""
        deadline = time.monotonic() + timeout
        prev = None
        while True:
            cur = access_counts(self.log, port)
            n = sum(cur.values())
            done = (expect is None or n >= expect) and cur == prev
            if done or time.monotonic() > deadline:
                return cur
            prev = cur
            time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): the access log is already on disk."""
        _stop(self.proc, signal.SIGTERM)


@contextlib.contextmanager
def nginx_h2(tmpdir: Union[str, Path], workers: int = 2, keepalive_requests: int = 100000):
    """NginxH2 serving / (200 "hello\\n"), /missing (404), /boom (500), /big
    (200, 100 KiB) and /users/* (200) on three ports: h1_port (HTTP/1.1),
    h2c_port (h2c, prior knowledge) and tls_port (h2 or http/1.1 by ALPN).
    keepalive_requests (nginx's default is 1000: then it sends GOAWAY and
    the client reconnects) is high by default so a load run keeps its
    connections."""
    n = NginxH2(Path(tmpdir), workers, keepalive_requests)
    try:
        yield n
    finally:
        n.stop()


# ------------------------------------------------------------------ clients

@dataclasses.dataclass
class H2loadResult:
    protocol: str            # "h2" (TLS, ALPN) or "h2c"
    seconds: float
    rps: float
    total: int               # requests: total, started, done, succeeded, failed, errored, timeout
    started: int
    done: int
    succeeded: int           # 2xx and 3xx
    failed: int              # not succeeded, HTTP errors included
    errored: int             # failed without a response (stream or connection errors)
    timeout: int
    status: dict             # "2xx".."5xx" -> count
    output: str


def h2load(url: Union[str, Iterable[str]], n: Optional[int] = None, c: int = 1, m: int = 1,
           duration: Optional[float] = None, threads: int = 1, headers: Iterable[str] = (),
           data: Optional[Union[str, Path]] = None, timeout: float = 120.0) -> H2loadResult:
    """h2load against url (a list: the same host's paths, taken in turn) with
    c clients (connections), m streams in flight on each, threads threads,
    and n requests, or for duration s (-D). http:// is h2c by prior
    knowledge, https:// h2 by ALPN (h2load gives up without it). headers:
    "name: value" strings; data: a file POSTed with every request. Raises if
    h2load fails or is still running after timeout s."""
    urls = [url] if isinstance(url, str) else list(url)
    argv = ["h2load", f"-c{c}", f"-m{m}", f"-t{threads}"]
    if duration is not None:
        argv.append(f"-D{duration:g}")
    else:
        argv.append(f"-n{n if n is not None else c}")
    for h in headers:
        argv += ["-H", h]
    if data is not None:
        argv += ["-d", str(data)]
    proc = _start(argv + urls, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, signal.SIGKILL)
        raise RuntimeError(f"h2load still running after {timeout}s: {' '.join(argv + urls)}")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited {proc.returncode}:\n{out}")
    fin = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not (fin and req and st):
        raise RuntimeError(f"h2load printed no summary:\n{out}")
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    return H2loadResult(proto.group(1) if proto else "?", secs, float(fin.group(3)),
                        *(int(x) for x in req.groups()),
                        {k: int(v) for k, v in zip(("2xx", "3xx", "4xx", "5xx"), st.groups())}, out)


def curl_h2(url: str, tls: Optional[bool] = None, traceparent: Optional[str] = None, method: str = "GET",
            timeout: float = 10.0) -> int:
    """One request over HTTP/2 with curl: TLS by ALPN (--http2, -k) or
    cleartext by prior knowledge (--http2-prior-knowledge); tls defaults to
    the URL's scheme. Returns the status; raises if curl failed or did not
    speak HTTP/2."""
    if tls is None:
        tls = url.startswith("https:")
    assert tls == url.startswith("https:"), f"tls={tls} for {url}"
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--noproxy", "*",
            "-m", f"{timeout:g}"]
    argv += ["--http2", "-k"] if tls else ["--http2-prior-knowledge"]
    if traceparent:
        argv += ["-H", f"traceparent: {traceparent}"]
    argv += ["-I"] if method == "HEAD" else ["-X", method]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=timeout + 5)
    if out.returncode != 0:
        raise RuntimeError(f"curl {url} exited {out.returncode}: {out.stderr}")
    status, version = out.stdout.split()
    if version != "2":
        raise RuntimeError(f"curl spoke HTTP/{version} to {url}, not HTTP/2")
    return int(status)


# ------------------------------------------------------------------ gRPC

class GrpcServer:
    """tests/peers/grpc_peer.py server: demo.Echo on 127.0.0.1 (TLS with
    make_cert's certificate when tls)."""

    def __init__(self, d: Path, tls: bool = False, slow_seconds: float = 2.0, port: int = 0):
        self.d = Path(d)
        self.d.mkdir(parents=True, exist_ok=True)
        self.counts_path = self.d / f"grpc-counts-{os.getpid()}-{time.monotonic_ns()}.json"
        argv = [PEER_PYTHON, str(PEERS / "grpc_peer.py"), "server", "--port", str(port), "--counts",
                str(self.counts_path), "--slow-seconds", str(slow_seconds)]
        self.cert = None
        if tls:
            self.cert, key = make_cert(self.d)
            argv += ["--tls", str(self.cert), str(key)]
        self.stderr_path = self.counts_path.with_suffix(".stderr")
        self.proc = _start(argv, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), text=True)
        try:
            port_s, pid_s = _ready_line(self.proc, 30, "grpc server")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}: {self.stderr_path.read_text()}")
        self.port, self.pid = int(port_s), int(pid_s)
        self.target = f"127.0.0.1:{self.port}"

    def counts(self, timeout: float = 10.0) -> collections.Counter:
        """(method path, code name) -> calls, as the server saw them, once no
        call is in a handler (a Slow call's handler ends with the call)."""
        return _grpc_counter(_dumped(self.proc, self.counts_path, timeout))

    def stop(self) -> collections.Counter:
        """Stops it; its final counts."""
        _stop(self.proc, signal.SIGTERM)
        return _grpc_counter(_read_dump(self.counts_path) or {"counts": []})


def _grpc_counter(doc: dict) -> collections.Counter:
    return collections.Counter({(m, c): n for m, c, n in doc["counts"]})


@contextlib.contextmanager
def grpc_server(tmpdir: Union[str, Path], tls: bool = False, slow_seconds: float = 2.0):
    s = GrpcServer(Path(tmpdir), tls, slow_seconds)
    try:
        yield s
    finally:
        s.stop()


def grpc_client(target: str, unary: int = 0, fail: int = 0, slow: int = 0, stream: int = 0,
                stream_messages: int = 3, deadline: float = 0.2, traceparent: str = "none", parallel: int = 1,
                tls_cert: Optional[Union[str, Path]] = None, linger: float = 0.0, timeout: float = 60.0) -> dict:
    """tests/peers/grpc_peer.py client, a process of its own: that many calls
    of each method on one channel; {"pid", "calls": [{"method": "/demo.Echo/X",
    "code": "OK"|..., "traceparent", "messages", "details"}]}. traceparent:
    "none", "random" (a new one per call) or a value; tls_cert: TLS,
    trusting that certificate. Raises on failure or after timeout s."""
    argv = [PEER_PYTHON, str(PEERS / "grpc_peer.py"), "client", "--target", target, "--unary", str(unary),
            "--fail", str(fail), "--slow", str(slow), "--stream", str(stream), "--stream-messages",
            str(stream_messages), "--deadline", str(deadline), "--traceparent", traceparent, "--parallel",
            str(parallel), "--linger", str(linger)]
    if tls_cert:
        argv += ["--tls", str(tls_cert)]
    return _run_json(argv, timeout)


def grpc_call_counts(result: dict) -> collections.Counter:
    """(method path, code name) -> calls, of a grpc_client result."""
    return collections.Counter((c["method"], c["code"]) for c in result["calls"])


def _run_json(argv: list, timeout: float) -> dict:
    proc = _start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc, signal.SIGKILL)
        raise RuntimeError(f"{argv[1]} client still running after {timeout}s")
    finally:
        _stop(proc, signal.SIGKILL, 0)     # whatever it left in its group
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: {err}")
    return json.loads(out)


# ------------------------------------------------------------------ Node

class NodeH2Server:
    """tests/peers/node_h2.js server: h2c on h2c_port, h2 over TLS (ALPN h2
    only, make_cert's certificate) on tls_port."""

    def __init__(self, d: Path, tls: bool = True):
        self.d = Path(d)
        self.d.mkdir(parents=True, exist_ok=True)
        self.counts_path = self.d / f"node-counts-{os.getpid()}-{time.monotonic_ns()}.json"
        argv = [NODE, str(PEERS / "node_h2.js"), "server", "--counts", str(self.counts_path)]
        self.cert = None
        if tls:
            self.cert, key = make_cert(self.d)
            argv += ["--cert", str(self.cert), "--key", str(key)]
        self.stderr_path = self.counts_path.with_suffix(".stderr")
        self.proc = _start(argv, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), text=True)
        try:
            h2c, tls_port, pid = _ready_line(self.proc, 30, "node server")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}: {self.stderr_path.read_text()}")
        self.h2c_port, self.tls_port, self.pid = int(h2c), int(tls_port), int(pid)

    def url(self, kind: str, path: str = "/") -> str:
        """kind: "h2c" or "h2" (TLS)."""
        return {"h2c": f"http://127.0.0.1:{self.h2c_port}", "h2": f"https://127.0.0.1:{self.tls_port}"}[kind] + path

    def counts(self, timeout: float = 10.0) -> collections.Counter:
        """(method, path, status) -> streams the server closed; status is an
        int, or "reset" for a stream reset before its response ended."""
        return _node_counter(_dumped(self.proc, self.counts_path, timeout))

    def stop(self) -> collections.Counter:
        _stop(self.proc, signal.SIGTERM)
        return _node_counter(_read_dump(self.counts_path) or {"counts": []})


def _node_counter(doc: dict) -> collections.Counter:
    return collections.Counter({(m, p, s): n for m, p, s, n in doc["counts"]})


@contextlib.contextmanager
def node_h2_server(tmpdir: Union[str, Path], tls: bool = True):
    s = NodeH2Server(Path(tmpdir), tls)
    try:
        yield s
    finally:
        s.stop()


def node_h2_client(url: str, paths: Iterable[str] = ("/",), n: int = 1, method: str = "GET",
                   body: Optional[str] = None, traceparent: Optional[str] = None,
                   ca: Optional[Union[str, Path]] = None, concurrency: int = 1, linger: float = 0.0,
                   timeout: float = 60.0) -> dict:
    """tests/peers/node_h2.js client, a process of its own: one session to
    url (http:// h2c by prior knowledge, https:// h2 by ALPN, trusting ca),
    n rounds over paths, up to concurrency streams in flight. {"pid",
    "calls": [{"method", "path", "status", "bytes", "traceparent"}]}.
    traceparent: None, "random" (a new one per request) or a value."""
    argv = [NODE, str(PEERS / "node_h2.js"), "client", "--url", url, "--paths", ",".join(paths), "--n", str(n),
            "--method", method, "--concurrency", str(concurrency), "--linger", str(linger),
            "--traceparent", traceparent or "none"]
    if body is not None:
        argv += ["--body", body]
    if ca:
        argv += ["--ca", str(ca)]
    return _run_json(argv, timeout)


def node_call_counts(result: dict) -> collections.Counter:
    """(method, path, status) -> requests, of a node_h2_client result."""
    return collections.Counter((c["method"], c["path"], c["status"]) for c in result["calls"])
