"""HPACK (RFC 7541) decoding that survives lost state, for a tracer.

Why not hpack.Decoder: it raises on the first reference to a dynamic entry
it lacks, and it must see every header block from the connection's start.
A tracer joins connections mid-way and loses records; it must still read
what it can. This decoder keeps its own dynamic table where an index past
the entries seen since the join (or since the state was lost) is "unknown":
that field is missing, the rest of the block decodes. It uses the hpack
package for the static table and Huffman decoding.

It decodes only the header names in KEEP into values (others are walked over
and, when the peer inserts them, kept in the table so that indices stay
right), bounds the decoded list and the table, and caches blocks that leave
the table unchanged (most repeat requests and responses are such blocks).
"""
from __future__ import annotations

import itertools
from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE           # indices 1..61
PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":status", b":protocol"))
KEEP = PSEUDO | {b"content-type", b"traceparent", b"user-agent", b"grpc-timeout", b"grpc-status", b"grpc-message"}
DEFAULT_TABLE = 4096                        # SETTINGS_HEADER_TABLE_SIZE's initial value
MAX_TABLE = 16384                           # larger size updates are clamped (peers rarely go past 4096)
MAX_LIST = 65536                            # decoded header list bytes per block (RFC 7541 sizes: 32 + name + value)
CACHE_BLOCK = 256                           # longest block worth caching
CACHE_ENTRIES = 4096                        # the cache is cleared when it reaches this
HUFF_MEMO = 64                              # longest Huffman string worth remembering decoded

# Every table state gets a number no other table had: (gen, block) is a
# process-wide cache key, so one bounded dict serves every connection.
_GEN = itertools.count(1)
_CACHE: dict = {}
# Huffman strings decoded lately: servers re-insert the same values (nginx:
# server and date with each response), which must be decoded to size the
# table, and hpack's decoder is pure Python (~0.2 us a byte).
_HUFF: dict = {}


class _Malformed(Exception):
    """A representation no conforming encoder produces: the block is not HPACK."""


def _int(b: bytes, i: int, mask: int):
    """The integer (RFC 7541 5.1) whose prefix is b[i] & mask: (value, next i).
    Own code rather than hpack.hpack.decode_integer, which wants a slice per
    call and logs each one; this runs several times per header."""
    v = b[i] & mask
    i += 1
    if v < mask:
        return v, i
    shift = 0
    while True:
        c = b[i]                            # IndexError: the block ended inside it
        i += 1
        v += (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7
        if shift > 28:                      # no table index or string length is that large
            raise _Malformed


def _str(b: bytes, i: int, decode: bool):
    """The string literal (RFC 7541 5.2) at b[i]: (bytes, next i). Huffman
    strings decode only when asked (the value of a header nobody reads and
    nobody indexes is skipped, and sized by its coded length)."""
    huff = b[i] & 0x80
    n, i = _int(b, i, 0x7F)
    j = i + n
    if j > len(b):
        raise IndexError                    # runs past the end of the block
    s = b[i:j]
    if huff and decode:
        d = _HUFF.get(s)
        if d is None:
            d = decode_huffman(s)           # HPACKDecodingError on bad codes or padding
            if n <= HUFF_MEMO:
                if len(_HUFF) >= CACHE_ENTRIES:
                    _HUFF.clear()
                _HUFF[s] = d
        s = d
    return s, j


class Decoder:
    """One direction of one connection. `synced`: the table is known whole
    (seen from the connection's start); else entries older than those seen
    are unknown. decode() returns (fields, missing, bad): fields maps KEEP
    names to their first value (bytes; shared with the cache: do not modify);
    missing: some field could not be decoded; bad: the block is not valid
    HPACK (fields are then empty). Counts go into `stats` (hpack_error,
    oversized, table_capped)."""

    __slots__ = ("dyn", "size", "max_size", "synced", "gen", "stats")

    def __init__(self, stats: dict, synced: bool = True, max_size: int = DEFAULT_TABLE):
        self.dyn: deque = deque()           # (name or None if unknown, value, size); [0] is index 62
        self.size = 0
        self.max_size = max_size
        self.synced = synced
        self.gen = next(_GEN)
        self.stats = stats

    def lose(self) -> None:
        """Bytes of this direction went by unseen: nothing in the table is
        sure any more (any number of entries may have been inserted)."""
        self.dyn.clear()
        self.size = 0
        self.synced = False
        self.gen = next(_GEN)

    def _entry(self, idx: int):
        if idx <= 61:
            if idx == 0:
                raise _Malformed
            return STATIC[idx - 1]
        k = idx - 62
        if k < len(self.dyn):
            e = self.dyn[k]
            return e if e[0] is not None else None
        if self.synced:                     # a complete table lacks it: our state was wrong after all
            self.stats["hpack_error"] += 1
            self.synced = False
        return None

    def _insert(self, name, value: bytes) -> None:
        size = 32 + len(name or b"") + len(value)
        self.dyn.appendleft((name, value, size))
        self.size += size
        self._evict()

    def _evict(self) -> None:
        dyn = self.dyn
        while self.size > self.max_size:    # an entry larger than the table empties it (RFC 7541 4.4)
            self.size -= dyn.pop()[2]
        self.gen = next(_GEN)

    def _resize(self, size: int) -> None:
        if size > MAX_TABLE:
            self.stats["table_capped"] += 1
            size = MAX_TABLE
        self.max_size = size
        self._evict()
        if size == 0:
            self.synced = True              # the peer emptied its table: we know it whole again

    def decode(self, block: bytes, cut: bool = False):
        """Decode one header block; cut: its tail is missing (decode what
        comes before, then the table is lost)."""
        if not cut:
            hit = _CACHE.get((self.gen, block))
            if hit is not None:
                return hit[0], hit[1], False
        gen0 = self.gen
        fields: dict = {}
        missing = bad = regular = started = False
        total = i = 0
        n = len(block)
        try:
            while i < n:
                c = block[i]
                if c & 0x80:                                    # indexed field (6.1)
                    idx, i = _int(block, i, 0x7F)
                    e = self._entry(idx)
                    started = True
                    if e is None:
                        missing = True
                        continue
                    name, value = e[0], e[1]
                elif c & 0x40 or not c & 0x20:                  # literal field (6.2)
                    insert = c & 0x40
                    idx, i = _int(block, i, 0x3F if insert else 0x0F)
                    started = True
                    if idx:
                        e = self._entry(idx)
                        name = e[0] if e is not None else None
                    else:
                        name, i = _str(block, i, True)
                    value, i = _str(block, i, bool(insert) or name in KEEP)
                    if insert:
                        self._insert(name, value)
                    if name is None:
                        missing = True
                        continue
                else:                                           # dynamic table size update (6.3)
                    if started:
                        raise _Malformed
                    size, i = _int(block, i, 0x1F)
                    self._resize(size)
                    continue
                total += 32 + len(name) + len(value)
                if total > MAX_LIST:                            # a bomb: stop here, forget the table
                    self.stats["oversized"] += 1
                    self.lose()
                    return fields, True, False
                if name[:1] == b":":
                    if regular or name not in PSEUDO:           # pseudo-headers come first, and only these
                        raise _Malformed
                elif not regular:
                    regular = True
                if name in KEEP and name not in fields:
                    fields[name] = value
        except IndexError:
            if not cut:
                bad = True                                      # a complete block ended inside a field
        except (_Malformed, HPACKDecodingError):
            bad = True
        if bad:
            self.stats["hpack_error"] += 1
            self.lose()
            return {}, True, True
        if cut:
            self.lose()
            return fields, True, False
        if self.gen == gen0 and n <= CACHE_BLOCK:
            if len(_CACHE) >= CACHE_ENTRIES:
                _CACHE.clear()
            _CACHE[(gen0, block)] = (fields, missing)
        return fields, missing, False
