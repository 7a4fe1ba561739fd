"""The kernel's HTTP/2 records (bpf/l7/http2.h: struct h2_rec_head, then
struct h2_item each followed by its payload piece, padded to 8) as the
decoder's FrameEvents. One record is one read or write of a connection, or
its close."""
from __future__ import annotations

import struct

from .http2 import CLOSED, FrameEvent

_HEAD = struct.Struct("=QQII16s16sHHB3sHBBBBBB16s")     # struct h2_rec_head
_ITEM = struct.Struct("=QIIHHBBBxQI4x")                 # struct h2_item
assert _HEAD.size == 88 and _ITEM.size == 40


def frame_events(raw: bytes) -> list:
    """The FrameEvents of one record, in the order the kernel walked them."""
    (conn_id, ts, tgid, tid, laddr, raddr, lport, rport, family, _pad, used, direction, tls, role_hint, fresh,
     gap, closed, comm) = _HEAD.unpack_from(raw)
    comm_s = comm.split(b"\0", 1)[0].decode("utf-8", "replace")
    if closed:
        return [FrameEvent(conn_id, ts, 0, tgid, tid, laddr, raddr, lport, rport, family, 0, 0, 0, CLOSED, 0,
                           direction, bool(tls), role_hint, bool(fresh), False, comm_s, b"")]
    out = []
    at, end = _HEAD.size, min(_HEAD.size + used, len(raw))
    first = True
    while at + _ITEM.size <= end:
        pos, length, sid, piece_off, piece_len, ftype, flags, kflags, bhash, bgen = _ITEM.unpack_from(raw, at)
        data = raw[at + _ITEM.size:at + _ITEM.size + piece_len]
        out.append(FrameEvent(conn_id, ts, pos, tgid, tid, laddr, raddr, lport, rport, family, length, sid,
                              piece_off, ftype, flags, direction, bool(tls), role_hint, bool(fresh),
                              bool(gap) and first, comm_s, data, kflags, bgen, bhash))
        first = False
        at += (_ITEM.size + piece_len + 7) & ~7
    return out
