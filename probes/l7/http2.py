"""HTTP/2 and gRPC exchanges from the kernel's frame records (issue 14).

The kernel (bpf/l7/http2.h) sends one FrameEvent per interesting frame piece
(HEADERS, PUSH_PROMISE and CONTINUATION payloads, DATA with END_STREAM,
RST_STREAM, GOAWAY, and the connection's close); the contract is issue 14's
interface note, FrameEvent below its Python form. Here, per connection and
direction, header blocks are put back together and HPACK-decoded
(hpack_tolerant), and streams are paired into Exchanges: request headers,
response headers and trailers, and how the stream ended.

Bounds: MAX_CONNS connections (the least recently active one goes first),
MAX_STREAMS open streams per connection (the oldest goes first), header
blocks of MAX_BLOCK raw bytes, each direction's table of at most
hpack_tolerant.MAX_TABLE. Worst case a table holds ~512 tiny entries (~100
KiB of Python objects): the connection cap is what bounds the total.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional
from urllib.parse import unquote

from .hpack_tolerant import Decoder

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
CLOSED = 0xFF                               # not a frame: the connection closed
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
SERVER, CLIENT = 1, 2                       # role_hint / Exchange.role: what tgid is on the connection
IN, OUT = 0, 1                              # FrameEvent.direction, as seen by tgid
KERNEL_FRAME_BYTES = 4096                   # the kernel sends at most this much of a frame's payload
MAX_CONNS = 10000
MAX_STREAMS = 1000
MAX_BLOCK = 65536                           # raw bytes of one header block (HEADERS + CONTINUATIONs)
NOT_H2_AFTER = 3                            # bad header blocks before a connection is given up as not HTTP/2

STATS = {
    "exchanges": "exchanges produced",
    "partial": "exchanges with some header not decoded or not seen (joined mid-way, HPACK state or records lost)",
    "hpack_error": "header blocks that were not valid HPACK, or referenced an entry a complete table lacks",
    "truncated_block": "header blocks with bytes missing (kernel's per-frame cap, lost records, missed CONTINUATION)",
    "oversized": "header blocks whose decoded list passed 64 KiB: decoding stopped there",
    "table_capped": "HPACK table size updates above our cap, clamped",
    "bad_frame": "frames no peer may send (HEADERS on stream 0, padding past the payload, ...)",
    "streams_dropped": "streams forgotten because their connection had MAX_STREAMS open",
    "connections_dropped": "connections forgotten (least recently active) at MAX_CONNS",
    "not_http2": "connections whose header blocks never decoded as HTTP/2 requests or responses: then ignored",
    "unanswered": "streams that ended (reset, GOAWAY, close) before response headers",
    "unpaired": "responses on streams whose request was not seen",
    "internal_error": "exceptions caught in feed() (a bug: the connection is dropped)",
}


class FrameEvent(NamedTuple):
    """One ring-buffer record (interface.md)."""
    conn_id: int
    ts_ns: int
    frame_pos: int
    tgid: int
    tid: int
    laddr: bytes
    raddr: bytes
    lport: int
    rport: int
    family: int
    length: int
    stream_id: int
    piece_off: int
    ftype: int
    flags: int
    direction: int
    tls: bool
    role_hint: int
    fresh: bool
    gap: bool
    comm: str
    data: bytes


class Exchange(NamedTuple):
    """One stream: request, response, how it ended. Strings are None when not
    sent or not decodable (then partial is True). start_ns: the record with
    the request's first HEADERS piece; end_ns: the record that ended the
    stream (DATA with END_STREAM, the last piece of an END_STREAM header
    block, RST_STREAM, GOAWAY or the close). error_code: RST_STREAM's or
    GOAWAY's. tid and comm: of the request's record."""
    conn_id: int
    tgid: int
    tid: int
    comm: str
    role: int
    tls: bool
    laddr: bytes
    raddr: bytes
    lport: int
    rport: int
    family: int
    stream_id: int
    start_ns: int
    end_ns: int
    method: Optional[str]
    path: Optional[str]
    scheme: Optional[str]
    authority: Optional[str]
    status: Optional[int]
    traceparent: Optional[str]
    user_agent: Optional[str]
    content_type: Optional[str]
    grpc_timeout: Optional[str]
    resp_content_type: Optional[str]
    grpc_status: Optional[int]
    grpc_message: Optional[str]
    outcome: str                            # ok, reset, goaway, unanswered
    error_code: Optional[int]
    partial: bool

    @property
    def is_grpc(self) -> bool:
        """gRPC's content type, or (when that was not decodable: a connection
        joined mid-way) a header only gRPC sends."""
        ct = self.content_type or self.resp_content_type or ""
        return ct.startswith("application/grpc") or not (
            self.grpc_timeout is None and self.grpc_status is None and self.grpc_message is None)

    def grpc_method(self):
        """(service, method) of a gRPC path "/pkg.Service/Method", else None."""
        p = self.path or ""
        if not self.is_grpc or p[:1] != "/" or p.count("/") != 2:
            return None
        service, _, method = p[1:].partition("/")
        return (service, method) if service and method else None


def _s(v: Optional[bytes]) -> Optional[str]:
    return None if v is None else v.decode("utf-8", "replace")


def _n(v: Optional[bytes]) -> Optional[int]:
    return int(v) if v is not None and v.isdigit() and len(v) <= 9 else None


class _Stream:
    __slots__ = ("sid", "start", "tid", "comm", "req", "resp", "status", "grpc", "partial")

    def __init__(self, sid, ev, req, partial):
        self.sid, self.start, self.tid, self.comm = sid, ev.ts_ns, ev.tid, ev.comm
        self.req = req                      # request fields (bytes); {} when not decodable
        self.resp: dict = {}                # first response headers (final ones)
        self.status: Optional[int] = None
        self.grpc: dict = {}                # grpc-status / grpc-message from any response block
        self.partial = partial


class _Dir:
    """Header block assembly and HPACK state of one direction."""
    __slots__ = ("hp", "fpos", "fev", "flast", "fbuf", "fcut", "blk", "bev", "skip")

    def __init__(self, stats, fresh):
        self.hp = Decoder(stats, synced=fresh)
        self.fpos = -1                      # frame being put together: its frame_pos, first and last piece, bytes
        self.fev = self.flast = self.fbuf = None
        self.fcut = False                   # bytes of it went missing
        self.blk = self.bev = None          # header block awaiting CONTINUATION: bytes, its HEADERS' first piece
        self.skip = -1                      # a stream whose CONTINUATIONs are dropped (their block was cut)


class _Conn:
    __slots__ = ("ev", "role", "dirs", "streams", "proven", "bad", "blocks")

    def __init__(self, ev, stats):
        self.ev = ev                        # first record: addresses, tgid, tls
        self.role = ev.role_hint
        self.dirs = (_Dir(stats, ev.fresh), _Dir(stats, ev.fresh))
        self.streams: dict = {}
        self.proven = False                 # a block decoded as a request or a response
        self.bad = 0                        # bad blocks / frames before that
        self.blocks = 0


class Http2Tracker:
    """Pairs HTTP/2 streams of every connection into Exchanges. feed() every
    record in ring order; take_exchanges() returns those ended since the last
    call. Nothing raises out of feed()."""

    def __init__(self, max_conns: int = MAX_CONNS, max_streams: int = MAX_STREAMS):
        self.stats = dict.fromkeys(STATS, 0)
        self.max_conns, self.max_streams = max_conns, max_streams
        self._conns: OrderedDict = OrderedDict()
        self._ignored: OrderedDict = OrderedDict()    # conn_ids given up as not HTTP/2, until they close
        self._out: list = []

    def take_exchanges(self) -> list:
        out, self._out = self._out, []
        return out

    def feed(self, ev: FrameEvent) -> None:
        try:
            self._feed(ev)
        except Exception:                   # a decoder bug must not stop the agent's reader: lose the connection
            self.stats["internal_error"] += 1
            self._conns.pop(getattr(ev, "conn_id", None), None)

    def _feed(self, ev) -> None:
        cid = ev.conn_id
        c = self._conns.get(cid)
        if c is None:
            if ev.ftype == CLOSED or cid in self._ignored:
                if ev.ftype == CLOSED:
                    self._ignored.pop(cid, None)
                return
            if len(self._conns) >= self.max_conns:
                self._conns.popitem(last=False)
                self.stats["connections_dropped"] += 1
            c = self._conns[cid] = _Conn(ev, self.stats)
        else:
            self._conns.move_to_end(cid)
        t = ev.ftype
        if t == CLOSED:
            self._close(c, ev)
            return
        if not c.role and ev.role_hint:
            c.role = ev.role_hint
        d = c.dirs[ev.direction & 1]
        if ev.gap:                          # open streams may have missed a block: not sure any more
            self._lose(c, d)
            for s in c.streams.values():
                s.partial = True
        if d.fpos != ev.frame_pos and d.fev is not None:
            self._frame_done(c, d)          # the kernel moved on: the rest of that frame is not coming
        if t == HEADERS or t == CONTINUATION or t == PUSH_PROMISE:
            self._piece(c, d, ev)
            return
        if d.blk is not None:               # nothing may come between a HEADERS and its CONTINUATIONs
            self._block_done(c, d, None, cut=True)
        if t == DATA:
            if ev.flags & END_STREAM:
                s = c.streams.get(ev.stream_id)
                if s is not None and self._req_dir(c) == ev.direction ^ 1:
                    self._end(c, s, ev.ts_ns, "ok")
        elif t == RST_STREAM:
            s = c.streams.get(ev.stream_id)
            if s is not None:
                self._end(c, s, ev.ts_ns, "reset", int.from_bytes(ev.data[:4], "big"))
        elif t == GOAWAY and len(ev.data) >= 8:
            last = int.from_bytes(ev.data[:4], "big") & 0x7FFFFFFF
            if self._req_dir(c) != ev.direction:    # the server's GOAWAY: our (client-opened) streams above last died
                code = int.from_bytes(ev.data[4:8], "big")
                for s in [s for s in c.streams.values() if s.sid > last]:
                    self._end(c, s, ev.ts_ns, "goaway", code)

    @staticmethod
    def _req_dir(c) -> int:
        """Direction carrying requests; -1 while the role is unknown."""
        return IN if c.role == SERVER else OUT if c.role == CLIENT else -1

    def _lose(self, c, d) -> None:
        if d.fev is not None:
            self._frame_done(c, d)
        if d.blk is not None:
            self._block_done(c, d, None, cut=True)
        d.hp.lose()

    # --- header blocks from pieces -------------------------------------------------

    def _piece(self, c, d, ev) -> None:
        off, n = ev.piece_off, len(ev.data)
        if d.fev is None:
            if off == 0 and n == ev.length:             # the common case: the whole frame in one record
                self._frame(c, d, ev, ev.data, False, ev)
                return
            d.fpos, d.fev, d.fbuf, d.fcut = ev.frame_pos, ev, bytearray(), off != 0
        d.flast = ev
        if off == len(d.fbuf) and not d.fcut:
            d.fbuf += ev.data
        elif off > len(d.fbuf):
            d.fcut = True                   # a piece went missing; later ones are of no use to HPACK
        if off + n >= ev.length or off + n >= KERNEL_FRAME_BYTES:
            self._frame_done(c, d)

    def _frame_done(self, c, d) -> None:
        ev, last, buf = d.fev, d.flast, bytes(d.fbuf)
        d.fpos, d.fev, d.flast, d.fbuf = -1, None, None, None
        self._frame(c, d, ev, buf, d.fcut or len(buf) < ev.length, last)

    def _frame(self, c, d, ev, payload: bytes, cut: bool, last) -> None:
        """A whole frame (or as much as came). ev: its first piece; last: the record that ended it."""
        if ev.ftype == CONTINUATION:
            if d.blk is None or d.bev.stream_id != ev.stream_id:
                if d.skip != ev.stream_id:  # its HEADERS was never seen
                    self.stats["truncated_block"] += 1
                    d.hp.lose()
                if ev.flags & END_HEADERS:
                    d.skip = -1
                return
            if len(d.blk) + len(payload) > MAX_BLOCK:
                cut = True
            else:
                d.blk += payload
        else:
            if d.blk is not None:
                self._block_done(c, d, None, cut=True)
            d.skip = -1
            off, end = 0, ev.length         # the header block fragment: less padding, priority, promised id
            if ev.flags & PADDED:
                off = 1
                end -= payload[0] if payload else 0
            if ev.ftype == PUSH_PROMISE:
                off += 4
            elif ev.flags & PRIORITY_FLAG:
                off += 5
            if ev.stream_id == 0 or end < off:
                self.stats["bad_frame"] += 1
                self._bad(c)
                d.hp.lose()
                return
            d.bev = ev
            d.blk = payload[off:end] if ev.flags & END_HEADERS else bytearray(payload[off:end])
        if cut or ev.flags & END_HEADERS:
            self._block_done(c, d, last, cut)

    def _block_done(self, c, d, last, cut: bool) -> None:
        ev, blk = d.bev, bytes(d.blk)
        d.blk = d.bev = None
        if cut:
            self.stats["truncated_block"] += 1
            if not ev.flags & END_HEADERS:  # CONTINUATIONs may follow: of no use now
                d.skip = ev.stream_id
        fields, missing, bad = d.hp.decode(blk, cut)
        if not c.proven and not bad:
            c.blocks += 1
        if bad:
            self._bad(c)
            return
        if ev.ftype == PUSH_PROMISE:        # decoded for the table's sake; pushed streams are not traced
            return
        self._block(c, ev, last or ev, fields, missing)

    def _bad(self, c) -> None:
        if c.proven:
            return
        c.bad += 1
        if c.bad == NOT_H2_AFTER:           # (== : once, though the same record may find more)
            self.stats["not_http2"] += 1
            cid = c.ev.conn_id
            self._conns.pop(cid, None)
            self._ignored[cid] = True
            if len(self._ignored) > self.max_conns:
                self._ignored.popitem(last=False)

    # --- pairing -------------------------------------------------------------------

    def _block(self, c, ev, last, f: dict, missing: bool) -> None:
        status = f.get(b":status")
        is_req = b":method" in f
        if status is not None:
            status = _n(status)
            if status is None or not 100 <= status <= 599 or is_req:
                self._bad(c)
                return
        elif is_req:                        # a token, and an origin-form path (or none: CONNECT, or not decoded)
            p = f.get(b":path", b"/")
            if not f[b":method"].isalpha() or (p[:1] != b"/" and p != b"*"):
                self._bad(c)
                return
        if (is_req or status is not None) and not c.proven:
            c.proven = True
        rd = self._req_dir(c)
        if rd < 0:                          # joined mid-way: the first decodable block tells the role
            if is_req:
                c.role = SERVER if ev.direction == IN else CLIENT
            elif status is not None:
                c.role = CLIENT if ev.direction == IN else SERVER
            else:
                return                      # not telling (trailers of a stream opened before we came)
            rd = self._req_dir(c)
        sid = ev.stream_id
        s = c.streams.get(sid)
        if ev.direction == rd:
            if s is None and sid & 1 and (is_req or missing) and status is None:
                if len(c.streams) >= self.max_streams:
                    del c.streams[next(iter(c.streams))]
                    self.stats["streams_dropped"] += 1
                c.streams[sid] = _Stream(sid, ev, f, missing)
            return                          # else request trailers: nothing we report
        if s is None:
            if status is not None and sid & 1:      # (even: a pushed stream, not traced)
                self.stats["unpaired"] += 1
            return
        if missing:
            s.partial = True
        if status is not None and s.status is None and not 100 <= status < 200:
            s.status, s.resp = status, f
        if b"grpc-status" in f or b"grpc-message" in f:
            s.grpc = f
        if ev.flags & END_STREAM:
            self._end(c, s, last.ts_ns, "ok")

    def _end(self, c, s, ts: int, outcome: str, code: Optional[int] = None) -> None:
        del c.streams[s.sid]
        if s.status is None:
            if outcome == "ok":
                s.partial = True            # ended by a response whose headers we missed or could not read
            else:
                self.stats["unanswered"] += 1
        rq, rs, g = s.req, s.resp, s.grpc
        if not (b":method" in rq or s.status is not None):
            return                          # neither side decoded: nothing to report
        gm = g.get(b"grpc-message")
        e = c.ev
        self._out.append(Exchange(
            e.conn_id, e.tgid, s.tid, s.comm, c.role, e.tls, e.laddr, e.raddr, e.lport, e.rport, e.family,
            s.sid, s.start, ts, _s(rq.get(b":method")), _s(rq.get(b":path")), _s(rq.get(b":scheme")),
            _s(rq.get(b":authority")), s.status, _s(rq.get(b"traceparent")), _s(rq.get(b"user-agent")),
            _s(rq.get(b"content-type")), _s(rq.get(b"grpc-timeout")), _s(rs.get(b"content-type")),
            _n(g.get(b"grpc-status")), None if gm is None else unquote(gm.decode("utf-8", "replace")),
            outcome, code, s.partial))
        self.stats["exchanges"] += 1
        if s.partial:
            self.stats["partial"] += 1

    def _close(self, c, ev) -> None:
        for s in list(c.streams.values()):
            self._end(c, s, ev.ts_ns, "unanswered")
        if not c.proven and c.blocks + c.bad:
            self.stats["not_http2"] += 1
        self._conns.pop(ev.conn_id, None)
