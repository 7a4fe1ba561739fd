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

import struct
from collections import OrderedDict
from typing import NamedTuple, Optional
from urllib.parse import unquote

from .hpack_tolerant import Decoder

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
CLOSED = 0xFF                               # not a frame: the connection closed
STREAM = 0xFE                               # not a frame: a stream the kernel paired (bpf/l7/http2_pair.h)
# FrameEvent.kflags (enum h2_kflag): the kernel pairs the connection's streams; this piece ends a header
# block, whose key is (bgen, bhash); insertions into the table before this block were not sent
K_PAIRED, K_BLOCK_END, K_TABLE_LOST = 1, 2, 4
COUNTED = 0x100                             # a stream item's outcome: already counted in the kernel
CLOSED_KEPT = 3                             # tick() calls a closed paired connection's meanings are kept
MAX_MEANINGS = 4096                         # decoded header blocks kept per paired connection
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
    "unresolved": "kernel-paired streams whose header blocks user space no longer holds (counted partial)",
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
    kflags: int = 0                         # K_* (kernel-paired connections)
    bgen: int = 0                           # with K_BLOCK_END: the block's key
    bhash: int = 0


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
    counted: bool = False                   # already in the kernel's histogram (a span candidate only)

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
    __slots__ = ("ev", "role", "dirs", "streams", "proven", "bad", "blocks", "paired", "meanings", "closed",
                 "closed_ns")

    def __init__(self, ev, stats):
        self.ev = ev                        # first record: addresses, tgid, tls
        self.role = ev.role_hint
        self.dirs = (_Dir(stats, ev.fresh), _Dir(stats, ev.fresh))
        self.streams: dict = {}
        self.proven = False                 # a block decoded as a request or a response
        self.bad = 0                        # bad blocks / frames before that
        self.blocks = 0
        # the kernel pairs its streams (K_PAIRED: it saw the preface) and
        # sends a header block only the first time its key (direction, table
        # generation, hash) comes; here each is decoded once, kept by key
        self.paired = False
        self.meanings: dict = {}            # (direction, gen, hash) -> (fields, missing)
        self.closed = 0                     # tick() calls since it closed
        self.closed_ns = 0


class Http2Tracker:
    """Pairs HTTP/2 streams of every connection into Exchanges. feed() every
    record in ring order; take_exchanges() returns those ended since the last
    call. Nothing raises out of feed()."""

    def __init__(self, max_conns: int = MAX_CONNS, max_streams: int = MAX_STREAMS):
        self.stats = dict.fromkeys(STATS, 0)
        self.max_conns, self.max_streams = max_conns, max_streams
        self._conns: OrderedDict = OrderedDict()
        self._ignored: OrderedDict = OrderedDict()    # conn_ids given up as not HTTP/2, until they close
        self._closed: dict = {}             # paired connections closed: kept for the kernel's last counts
        self._newly_closed: set = set()     # ... closed since take_newly_closed()
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
        if ev.kflags & K_PAIRED:
            c.paired = True
        if c.paired and t == STREAM:
            self._kernel_stream(c, ev)
            return
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
        if c.paired:
            return                          # the kernel ends streams (and sends no DATA or RST_STREAM)
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
        ended = last is not None and last.kflags & K_BLOCK_END
        if ended and last.kflags & K_TABLE_LOST:
            d.hp.lose()                     # the kernel kept back insertions (repeats) this block may need
        fields, missing, bad = d.hp.decode(blk, cut)
        if c.paired:
            # decoded once, named by its key: the kernel pairs the stream
            if ended and len(c.meanings) < MAX_MEANINGS:
                c.meanings[(last.direction & 1, last.bgen, last.bhash)] = ({} if bad else fields,
                                                                          missing or cut or bad)
            return
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
        ex = self._exchange(c, s, ts, outcome, code, False)
        if ex is not None:
            self._out.append(ex)

    def _exchange(self, c, s, ts: int, outcome: str, code: Optional[int], counted: bool, stats: bool = True):
        rq, rs, g = s.req, s.resp, s.grpc
        if not (b":method" in rq or s.status is not None):
            return None                     # neither side decoded: nothing to report
        gm = g.get(b"grpc-message")
        e = c.ev
        if stats:
            self.stats["exchanges"] += 1
            if s.partial:
                self.stats["partial"] += 1
        return Exchange(
            e.conn_id, e.tgid, s.tid, s.comm, c.role, e.tls, e.laddr, e.raddr, e.lport, e.rport, e.family,
            s.sid, s.start, ts, _s(rq.get(b":method")), _s(rq.get(b":path")), _s(rq.get(b":scheme")),
            _s(rq.get(b":authority")), s.status, _s(rq.get(b"traceparent")), _s(rq.get(b"user-agent")),
            _s(rq.get(b"content-type")), _s(rq.get(b"grpc-timeout")), _s(rs.get(b"content-type")),
            _n(g.get(b"grpc-status")), None if gm is None else unquote(gm.decode("utf-8", "replace")),
            outcome, code, s.partial, counted)

    def _close(self, c, ev) -> None:
        for s in list(c.streams.values()):
            self._end(c, s, ev.ts_ns, "unanswered")
        if not c.proven and c.blocks + c.bad:
            self.stats["not_http2"] += 1
        self._conns.pop(ev.conn_id, None)
        if c.paired:
            c.closed_ns = ev.ts_ns
            self._closed[ev.conn_id] = c    # the kernel's counts of it are read once more
            self._newly_closed.add(ev.conn_id)

    # --- kernel-paired connections -------------------------------------------------

    _STREAM_ITEM = struct.Struct("=QQQI4xQI4xQI4xII")     # struct h2_stream_item

    def _meaning(self, c, direction: int, gen: int, bhash: int):
        """(fields, missing) of a block key; ({}, True) when not held."""
        if not bhash:
            return None
        m = c.meanings.get((direction, gen, bhash))
        if m is None:
            self.stats["unresolved"] += 1
            return {}, True
        return m

    def _kernel_exchange(self, c, sid, tid, comm, start, end, req, resp, trl, outcome, code, counted,
                         stats: bool = True):
        """An Exchange from a kernel-paired stream's block keys ((gen, hash) each)."""
        rq_dir = IN if c.role == SERVER else OUT
        rq = self._meaning(c, rq_dir, *req) or ({}, True)
        s = _Stream(sid, c.ev, rq[0], rq[1])
        s.start, s.tid, s.comm = start, tid, comm
        for key in (resp, trl):
            m = self._meaning(c, rq_dir ^ 1, *key)
            if m is None:
                continue
            f, missing = m
            if missing:
                s.partial = True
            status = _n(f.get(b":status"))
            if status is not None and s.status is None and not 100 <= status < 200:
                s.status, s.resp = status, f
            if b"grpc-status" in f or b"grpc-message" in f:
                s.grpc = f
        if s.status is None and outcome == "ok":
            s.partial = True
        return self._exchange(c, s, end, outcome, code, counted, stats)

    def _kernel_stream(self, c, ev) -> None:
        """A stream the kernel paired and sends up: reset, sampled, or not
        countable there."""
        if len(ev.data) < self._STREAM_ITEM.size:
            self.stats["bad_frame"] += 1
            return
        (start, end, rqh, rqg, rsh, rsg, tlh, tlg, outcome, code) = self._STREAM_ITEM.unpack_from(ev.data)
        reset = (outcome & 0xFF) == 1
        ex = self._kernel_exchange(c, ev.stream_id, ev.tid, ev.comm, start, end, (rqg, rqh), (rsg, rsh),
                                   (tlg, tlh), "reset" if reset else "ok", code if reset else None,
                                   bool(outcome & COUNTED))
        if ex is not None:
            self._out.append(ex)
            if reset and ex.status is None:
                self.stats["unanswered"] += 1

    PENDING = "pending"

    def resolve(self, conn_id: int, req: tuple, resp: tuple, trl: tuple, wait: bool = True):
        """What a kernel histogram entry counts: an Exchange (times 0) from its
        block keys; None for a connection not held (dropped, or closed long
        ago); PENDING (with wait) when a block it names has not been read
        from the ring yet (the kernel counts a stream as it ends, the blocks
        come through the ring)."""
        c = self._conns.get(conn_id) or self._closed.get(conn_id)
        if c is None:
            return None
        if wait:
            rq_dir = IN if c.role == SERVER else OUT
            for d, (gen, h) in ((rq_dir, req), (rq_dir ^ 1, resp), (rq_dir ^ 1, trl)):
                if h and (d, gen, h) not in c.meanings:
                    return self.PENDING
        return self._kernel_exchange(c, 0, 0, c.ev.comm, 0, 0, req, resp, trl, "ok", None, True, stats=False)

    def streams_left_open(self, entries) -> list:
        """Exchanges of the kernel-paired streams (conn_id, sid, start_ns, req,
        resp, trl, state) still open when their connection closed: one whose
        response had begun ends with the close (as HTTP/1's response without
        a length), one without a response is unanswered."""
        out = []
        for conn_id, sid, start, req, resp, trl, state in entries:
            c = self._closed.get(conn_id)
            if c is None:
                continue
            ex = self._kernel_exchange(c, sid, 0, c.ev.comm, start, max(c.closed_ns, start), req,
                                       resp if state == 2 else (0, 0), trl, "ok" if state == 2 else "unanswered",
                                       None, False)
            if ex is not None:
                out.append(ex)
        return out

    def take_newly_closed(self) -> set:
        """Paired connections closed since the last call (their streams the
        kernel still holds are swept once: nothing is added after the close)."""
        out, self._newly_closed = self._newly_closed, set()
        return out

    def is_closed(self, conn_id: int) -> bool:
        return conn_id in self._closed or conn_id not in self._conns

    def tick(self) -> None:
        """Once per collection: closed paired connections go after a few."""
        for cid in list(self._closed):
            c = self._closed[cid]
            c.closed += 1
            if c.closed > CLOSED_KEPT:
                del self._closed[cid]
