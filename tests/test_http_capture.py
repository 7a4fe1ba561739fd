"""Both ways the http probe sees reads and writes, on every kind of socket
call a server or client makes: the socket-layer tracepoints (this kernel's
default) and the sys_exit tracepoint (what kernels before 6.3 run).

A Python server and a Python client, each in its own process, talk HTTP/1.1
over one keep-alive connection, each request sent and answered with a
different family of calls: send/recv with MSG_PEEK first, sendmsg/recvmsg,
writev/readv, and a body through sendfile. Ground truth: what the server
logged and what the client received. The counts per (method, status) must
be exact on both sides, in both capture modes.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import AgentProcess, curl, needs_root, wait_until
from otlp_data import latest_per_series, points, read_jsonl

pytestmark = [needs_root]

SERVER = textwrap.dedent(r"""
    import os, socket, sys, tempfile
    body_file = tempfile.TemporaryFile()
    body_file.write(b"f" * 20000)
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(4)
    print(s.getsockname()[1], flush=True)
    c, _ = s.accept()
    def head():
        data = b""
        while b"\r\n\r\n" not in data:
            c.recv(64, socket.MSG_PEEK)          # looked at first, then read: one request
            chunk = c.recv(65536)
            if not chunk:
                return None
            data += chunk
        return data
    while True:
        req = head()
        if req is None:
            break
        method, path = req.split(b" ")[:2]
        style = path.strip(b"/")
        if style == b"msg":
            status, body = 201, b"m" * 300
            c.sendmsg([b"HTTP/1.1 201 Created\r\nContent-Length: 300\r\n\r\n", body])
        elif style == b"vec":
            status, body = 202, b"v" * 4000
            os.writev(c.fileno(), [b"HTTP/1.1 202 Accepted\r\nContent-Length: 4000\r\n\r\n", body[:1000],
                                   body[1000:]])
        elif style == b"file":
            status = 203
            c.sendall(b"HTTP/1.1 203 Non-Authoritative Information\r\nContent-Length: 20000\r\n\r\n")
            c.sendfile(body_file, 0)
        else:
            status = 404
            c.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
        print(method.decode(), status, flush=True)
""")

CLIENT = textwrap.dedent(r"""
    import os, socket, sys
    port, rounds = int(sys.argv[1]), int(sys.argv[2])
    c = socket.create_connection(("127.0.0.1", port))
    def response():
        data = b""
        while b"\r\n\r\n" not in data:
            buf = bytearray(65536)
            n = c.recvmsg_into([buf])[0] if len(data) % 2 else os.readv(c.fileno(), [buf])
            data += bytes(buf[:n])
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += c.recv(65536)
        return int(head.split(b" ")[1])
    for _ in range(rounds):
        for path in ("msg", "vec", "file", "missing"):
            req = f"GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            if path == "msg":
                c.sendmsg([req[:20], req[20:]])       # the request line whole in the first segment
            elif path == "vec":
                os.writev(c.fileno(), [req[:-2], req[-2:]])
            else:
                c.sendall(req)
            print("GET", response(), flush=True)
    c.close()
""")


def counts(requests, name: str, port: int) -> collections.Counter:
    """Latest cumulative count per (method, status) of the series of port."""
    out = collections.Counter()
    for _m, dp, a in latest_per_series(points(requests, name, server__port=port)):
        out[(a["http.request.method"], a["http.response.status_code"])] += dp.count
    return out


@pytest.mark.parametrize("capture", ["auto", "syscalls"])
def test_every_socket_call_family_counts_exactly(tmp_path, capture):
    out = tmp_path / "telemetry.jsonl"
    agent = AgentProcess(tmp_path, {"interval": "0.5s", "lock_file": str(tmp_path / "lock"), "health": "",
                                    "exporters": {"file": {"path": str(out)}},
                                    "probes": {"http": {"capture": capture, "tls": False, "spans": False}}})
    srv = None
    try:
        agent.wait_for_log("collecting every", timeout=60)
        expected_line = ("capture: sock_send_length" if capture == "auto" else "capture: sys_exit")
        assert expected_line in agent.stderr(), agent.stderr()
        srv = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        port = int(srv.stdout.readline())
        client = subprocess.run([sys.executable, "-c", CLIENT, str(port), "5"], capture_output=True, text=True,
                                timeout=60)
        assert client.returncode == 0, client.stderr
        logged, _ = srv.communicate(timeout=10)
        truth = collections.Counter((m, int(s)) for m, s in (line.split() for line in logged.splitlines()))
        received = collections.Counter((m, int(s)) for m, s in (line.split() for line in client.stdout.splitlines()))
        assert truth == received == {("GET", 201): 5, ("GET", 202): 5, ("GET", 203): 5, ("GET", 404): 5}

        def both():
            reqs = read_jsonl(out) if out.exists() else []
            return (counts(reqs, "http.server.request.duration", port) == truth and
                    counts(reqs, "http.client.request.duration", port) == truth)
        assert wait_until(both), (counts(read_jsonl(out), "http.server.request.duration", port),
                                  counts(read_jsonl(out), "http.client.request.duration", port))
        assert agent.stop() == 0 and "Traceback" not in agent.stderr(), agent.stderr()
    finally:
        agent.kill()
        if srv is not None:
            srv.kill()


CLOSE_DELIMITED_SERVER = textwrap.dedent(r"""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(8)
    print(s.getsockname()[1], flush=True)
    for _ in range(5):
        c, _ = s.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"z" * 3000)
        c.close()                          # no length: the close ends the body
""")


def test_a_response_that_ends_at_the_close_is_named_by_its_own_process(tmp_path):
    """A response without a length ends when its connection closes, which
    the kernel sees in softirq, in whatever task runs then (often the peer):
    the series still carry the process that made the request or served it."""
    out = tmp_path / "telemetry.jsonl"
    agent = AgentProcess(tmp_path, {"interval": "0.5s", "lock_file": str(tmp_path / "lock"), "health": "",
                                    "exporters": {"file": {"path": str(out)}},
                                    "probes": {"http": {"tls": False, "spans": False}}})
    srv = None
    try:
        agent.wait_for_log("collecting every", timeout=60)
        srv = subprocess.Popen([sys.executable, "-c", CLOSE_DELIMITED_SERVER], stdout=subprocess.PIPE, text=True)
        port = int(srv.stdout.readline())
        for _ in range(5):
            assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/x") == "200"
        srv.wait(timeout=10)

        def names(name):
            reqs = read_jsonl(out) if out.exists() else []
            got = collections.Counter()
            for _m, dp, a in latest_per_series(points(reqs, name, server__port=port)):
                got[a["process.executable.name"]] += dp.count
            return got
        assert wait_until(lambda: names("http.client.request.duration") == {"curl": 5}), \
            names("http.client.request.duration")
        server_name = os.path.basename(sys.executable)[:15]   # the comm exec gave the server
        assert wait_until(lambda: names("http.server.request.duration") == {server_name: 5}), \
            names("http.server.request.duration")
        assert agent.stop() == 0 and "Traceback" not in agent.stderr(), agent.stderr()
    finally:
        agent.kill()
        if srv is not None:
            srv.kill()
