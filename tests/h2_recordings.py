"""Recorded HTTP/2 conversations for the decoder's tests: a recording TCP relay,
nginx serving cleartext HTTP/2, an in-process gRPC server, and walk(), the
Python twin of the kernel's frame walker that turns recorded bytes into the
FrameEvents the kernel would send (issue 14's interface note)."""
from __future__ import annotations

import os
import selectors
import socket
import subprocess
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

from probes.l7.http2 import (CLOSED, CONTINUATION, DATA, END_STREAM, GOAWAY, HEADERS, KERNEL_FRAME_BYTES,
                             PUSH_PROMISE, RST_STREAM, FrameEvent)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
C2S, S2C = 0, 1                             # relay directions: client->server, server->client
PIECE = 1024                                # payload bytes per record (interface.md)


class Relay:
    """Listens on 127.0.0.1 (self.port), connects every accepted client to
    127.0.0.1:target, copies both ways and keeps each read: self.conns[i] is
    a list of (ts_ns, direction, bytes) in the order read, b"" for an EOF.
    One thread, one select loop: the order of the list is the order of
    events, and a read is recorded before it is forwarded (so a response is
    always recorded after the request it answers)."""

    def __init__(self, target: int):
        self.target = target
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.conns: list = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ, None)
        open_socks = []
        while not self._stop:
            for key, _ in sel.select(0.05):
                if key.data is None:
                    cli, _ = self.lsock.accept()
                    srv = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                    rec: list = []
                    self.conns.append(rec)
                    for s, d, peer in ((cli, C2S, srv), (srv, S2C, cli)):
                        s.settimeout(5)
                        sel.register(s, selectors.EVENT_READ, (rec, d, peer))
                        open_socks.append(s)
                    continue
                rec, d, peer = key.data
                try:
                    buf = key.fileobj.recv(65536)
                except OSError:
                    buf = b""
                rec.append((time.monotonic_ns(), d, buf))
                try:
                    if buf:
                        peer.sendall(buf)
                    else:
                        sel.unregister(key.fileobj)
                        peer.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        for s in open_socks:
            s.close()
        self.lsock.close()

    def wait_closed(self, n: int = 1, timeout: float = 10) -> None:
        """Until the first n connections saw EOF both ways."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.conns) >= n and all(sum(1 for _, _, b in c if not b) >= 2 for c in self.conns[:n]):
                return
            time.sleep(0.02)
        raise TimeoutError(f"relay: {len(self.conns)} connections, not all closed")

    def close(self):
        self._stop = True
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


@contextmanager
def nginx_h2c(tmp: Path, extra: str = ""):
    """nginx with `listen 127.0.0.1:PORT http2` (cleartext, prior knowledge);
    yields the port. Locations: /hello 200, /created 201, /big (a 40 KB
    body), anything else 404."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    temps = " ".join(f"{k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "www").mkdir(exist_ok=True)
    (tmp / "www" / "big").write_bytes(b"x" * 40000)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    {temps}
    large_client_header_buffers 4 16k;
    {extra}
    server {{
        listen 127.0.0.1:{port} http2;
        location = /hello {{ add_header x-served nginx; return 200 "hello\\n"; }}
        location = /created {{ return 201 "made\\n"; }}
        location = /big {{ root {tmp}/www; }}
        location / {{ return 404; }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def curl(port: int, paths, headers=(), timeout: float = 20):
    """curl --http2-prior-knowledge fetching every path at once on one
    connection (curl 7.88.1 fails to reuse an h2c connection once its first
    stream ended, "Error in the HTTP2 framing layer", so every request is
    opened before any ends: --parallel-immediate). Returns sorted (path,
    status) pairs."""
    args = ["curl", "-sS", "--no-progress-meter", "--http2-prior-knowledge", "--max-time", str(timeout / 2),
            "--parallel", "--parallel-max", "100", "-w", "%{http_code} %{url_effective}\\n"]
    for h in headers:
        args += ["-H", h]
    for p in paths:
        args += ["-o", "/dev/null", f"http://127.0.0.1:{port}{p}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout
    return sorted((url.split(str(port), 1)[1], int(code)) for code, url in (ln.split() for ln in out.splitlines()))


def _ident(b):
    return b


@contextmanager
def grpc_server():
    """A gRPC server (grpcio, generic handlers, bytes in and out) of service
    test.Echo: Unary and Again echo, Fail aborts NOT_FOUND "no such thing: <req>",
    Sleep sleeps <req> ms then echoes, Stream sends <req> messages. Yields
    the port."""
    import grpc

    def unary(req, ctx):
        return req

    def fail(req, ctx):
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.decode())

    def sleep(req, ctx):
        time.sleep(int(req) / 1000)
        return req

    def stream(req, ctx):
        for i in range(int(req)):
            yield b"m%d" % i

    uu = lambda f: grpc.unary_unary_rpc_method_handler(f, _ident, _ident)   # noqa: E731
    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": uu(unary), "Again": uu(unary), "Fail": uu(fail), "Sleep": uu(sleep),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, _ident, _ident)})
    server = grpc.server(futures.ThreadPoolExecutor(16), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait(5)


def grpc_channel(port: int):
    import grpc
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])


def grpc_call(channel, method: str, req: bytes, traceparent: str = "", timeout: float = 5, stream=False):
    md = (("traceparent", traceparent),) if traceparent else None
    if stream:
        return channel.unary_stream(f"/test.Echo/{method}", _ident, _ident)(req, metadata=md, timeout=timeout)
    return channel.unary_unary(f"/test.Echo/{method}", _ident, _ident).future(req, metadata=md, timeout=timeout)


# --- the kernel's walker, in Python -----------------------------------------------

def frame_boundary(rec, direction: int, at_least: int) -> int:
    """Offset of the first frame header at or after `at_least` bytes of one
    direction of a recording (the client's preface skipped)."""
    data = b"".join(b for _, d, b in rec if d == direction)
    pos = len(PREFACE) if direction == C2S else 0
    while pos < at_least:
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
    return pos


def frames(rec, direction: int):
    """(offset, type, flags, stream_id, payload) of every frame of one direction."""
    data = b"".join(b for _, d, b in rec if d == direction)
    pos = len(PREFACE) if direction == C2S else 0
    out = []
    while pos + 9 <= len(data):
        n = int.from_bytes(data[pos:pos + 3], "big")
        out.append((pos, data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    return out


def rechunk(rec, size: int):
    """The same bytes read `size` bytes at a time (the reads' times kept)."""
    return [(ts, d, b[i:i + size]) for ts, d, b in rec for i in range(0, max(len(b), 1), size)]


def walk(rec, *, conn_id: int = 1, side: str = "server", fresh: bool = True, skip=(0, 0), tgid: int = 100,
         tid: int = 101, comm: str = "peer", tls: bool = False, preface: bool = True):
    """FrameEvents for a relay recording, as the kernel's walker sends them
    for process `tgid` on one end ("server": it reads the client's bytes, so
    client->server is direction 0; "client": direction 1). Per direction it
    skips the client's preface, then reads 9-byte frame headers and payloads
    across read boundaries, and sends: HEADERS / PUSH_PROMISE / CONTINUATION
    payload in pieces of at most 1024 bytes, a new piece at each read
    boundary, at most 4096 payload bytes per frame; DATA with END_STREAM (no
    payload), at its header; RST_STREAM's 4 and GOAWAY's first 8 payload bytes,
    in the read that completes them; a close (0xFF) after the last read.
    skip: bytes of each relay direction (C2S, S2C) not seen (a join mid-way;
    give frame boundaries); fresh=False also sends role_hint 0. preface=False:
    walk the client's bytes as frames from byte 0 (a non-HTTP/2 stream)."""
    dir_of = {C2S: 0, S2C: 1} if side == "server" else {C2S: 1, S2C: 0}
    role = (1 if side == "server" else 2) if fresh else 0
    addr = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    ports = (8080, 40000) if side == "server" else (40000, 8080)
    out: list = []
    st = {}
    for d in (C2S, S2C):
        start = skip[d] if skip[d] else (len(PREFACE) if d == C2S and preface else 0)
        st[d] = {"seen": 0, "start": start, "hdr": b"", "f": None}

    def emit(ts, d, f, off, data, ftype=None):
        out.append(FrameEvent(conn_id, ts, f["pos"], tgid, tid, addr, addr, ports[0], ports[1], 10, f["len"],
                              f["sid"], off, f["type"] if ftype is None else ftype, f["flags"], dir_of[d], tls,
                              role, fresh, False, comm, bytes(data)))

    last_ts = 0
    for ts, d, data in rec:
        last_ts = ts
        s = st[d]
        base = s["seen"]                                  # offset of data[0] in its direction
        s["seen"] += len(data)
        i = max(0, min(len(data), s["start"] - base))     # bytes before the walker's start are not seen
        while i < len(data):
            f = s["f"]
            if f is None:                                 # a frame header, maybe across reads
                take = data[i:i + 9 - len(s["hdr"])]
                s["hdr"] += take
                i += len(take)
                if len(s["hdr"]) < 9:
                    break
                h, s["hdr"] = s["hdr"], b""
                f = {"pos": base + i - 9, "len": int.from_bytes(h[:3], "big"), "type": h[3], "flags": h[4],
                     "sid": int.from_bytes(h[5:9], "big") & 0x7FFFFFFF, "got": 0, "ctrl": b""}
                if f["type"] == DATA and f["flags"] & END_STREAM:
                    emit(ts, d, f, 0, b"")
                if f["len"] == 0:
                    if f["type"] in (HEADERS, CONTINUATION, PUSH_PROMISE, RST_STREAM, GOAWAY):
                        emit(ts, d, f, 0, b"")
                else:
                    s["f"] = f
                continue
            chunk = data[i:i + f["len"] - f["got"]]       # payload bytes of this frame in this read
            i += len(chunk)
            off = f["got"]
            f["got"] += len(chunk)
            if f["type"] in (HEADERS, CONTINUATION, PUSH_PROMISE):
                while chunk and off < KERNEL_FRAME_BYTES:
                    piece = chunk[:min(PIECE, KERNEL_FRAME_BYTES - off)]
                    emit(ts, d, f, off, piece)
                    off += len(piece)
                    chunk = chunk[len(piece):]
            elif f["type"] in (RST_STREAM, GOAWAY):
                need = 4 if f["type"] == RST_STREAM else 8
                if off < need:
                    f["ctrl"] += chunk[:need - off]
                    if len(f["ctrl"]) == need or f["got"] == f["len"]:
                        emit(ts, d, f, 0, f["ctrl"])
            if f["got"] == f["len"]:
                s["f"] = None
    out.append(FrameEvent(conn_id, last_ts, 0, tgid, tid, addr, addr, ports[0], ports[1], 10, 0, 0, 0, CLOSED, 0,
                          0, tls, role, fresh, False, comm, b""))
    return out


# --- what the bytes say: a full decode with the stock hpack.Decoder ----------------

def truth(rec):
    """Every stream of a whole recording, decoded from its first byte with
    hpack.Decoder (complete state, nothing tolerant): {stream_id: {"req":
    [headers dict per request block], "resp": [... per response block],
    "end": "ok" | "reset" | None}}. The decoder's tests compare with it."""
    import hpack
    out: dict = {}
    for d in (C2S, S2C):
        dec = hpack.Decoder()
        dec.max_allowed_table_size = 1 << 16
        block = head = None                 # header block so far; (type, flags, stream) of its HEADERS
        for _, ftype, flags, sid, payload in frames(rec, d):
            st = out.setdefault(sid, {"req": [], "resp": [], "end": None})
            if ftype in (HEADERS, PUSH_PROMISE):
                off, end = 0, len(payload)
                if flags & 0x8:
                    off, end = 1, end - payload[0]
                off += 4 if ftype == PUSH_PROMISE else 5 if flags & 0x20 else 0
                block, head = payload[off:end], (ftype, flags, sid)
            elif ftype == CONTINUATION:
                block += payload
            elif ftype == RST_STREAM and st["end"] is None:
                st["end"] = "reset"
            elif ftype == DATA and flags & END_STREAM and d == S2C and st["end"] is None:
                st["end"] = "ok"
            if ftype in (HEADERS, PUSH_PROMISE, CONTINUATION) and flags & 0x4:
                headers = dict(dec.decode(bytes(block)))
                htype, hflags, hsid = head
                if htype == HEADERS:
                    out[hsid]["req" if d == C2S else "resp"].append(headers)
                    if hflags & END_STREAM and d == S2C and out[hsid]["end"] is None:
                        out[hsid]["end"] = "ok"
    out.pop(0, None)
    return out


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def conversation(*steps, t0: int = 1_000_000):
    """A relay-like recording from (direction, bytes) steps, 1 ms apart,
    the client's preface first."""
    rec = [(t0, C2S, PREFACE)]
    for i, (d, b) in enumerate(steps, 1):
        rec.append((t0 + i * 1_000_000, d, b))
    return rec
