"""Source line of an instruction, from a code object's line table.

Three formats, each as the CPython of that version defines it (instruction
offsets are in 2-byte code units here):
  lnotab (3.8, 3.9): (byte offset delta, signed line delta) pairs, see
      Objects/lnotab_notes.txt of 3.8;
  linetable (3.10): (byte range length, signed line delta; -128 = no line)
      pairs, each closing one range;
  locations (3.11+, PEP 626/657): entries of a header byte (bit 7 set,
      code in bits 3-6, length-1 in code units in bits 0-2) and a
      code-specific tail, see Objects/locations.md of 3.11.
A truncated or corrupt table gives None (no line), never an exception.
"""
from __future__ import annotations

import functools

from typing import Optional

from .python_layouts import LINETABLE_310, LNOTAB, LOCATIONS


def _signed(b: int) -> int:
    return b - 256 if b > 127 else b


def lnotab_line(table: bytes, first: int, unit: int) -> int:
    addr, line, target = 0, first, unit * 2
    for i in range(0, len(table) - 1, 2):
        addr += table[i]
        if addr > target:
            break
        line += _signed(table[i + 1])
    return line


def linetable310_line(table: bytes, first: int, unit: int) -> Optional[int]:
    end, computed, target = 0, first, unit * 2
    for i in range(0, len(table) - 1, 2):
        start, end = end, end + table[i]
        delta = _signed(table[i + 1])
        line = None if delta == -128 else computed + delta
        if line is not None:
            computed = line
        if start <= target < end:
            return line
    return None


def _varint(table: bytes, i: int) -> tuple:
    b = table[i]
    val, shift = b & 63, 6
    i += 1
    while b & 64:
        b = table[i]
        val |= (b & 63) << shift
        shift += 6
        i += 1
    return val, i


def _svarint(table: bytes, i: int) -> tuple:
    v, i = _varint(table, i)
    return (-(v >> 1) if v & 1 else v >> 1), i


def locations_line(table: bytes, first: int, unit: int) -> Optional[int]:
    addr, line, i = 0, first, 0
    try:
        while i < len(table):
            head = table[i]
            i += 1
            if not head & 0x80:
                return None   # not at an entry start: corrupt
            code, length = (head >> 3) & 15, (head & 7) + 1
            this: Optional[int] = line
            if code == 15:                 # no location
                this = None
            elif code == 14:               # long form
                delta, i = _svarint(table, i)
                line += delta
                this = line
                for _ in range(3):         # end line delta, column+1, end column+1
                    _, i = _varint(table, i)
            elif code == 13:               # no columns
                delta, i = _svarint(table, i)
                line += delta
                this = line
            elif code >= 10:               # one-line forms: line delta is code - 10
                line += code - 10
                this = line
                i += 2
            else:                          # short forms: same line, one column byte
                i += 1
            if addr <= unit < addr + length:
                return this
            addr += length
    except IndexError:
        return None
    return None


_DECODERS = {LNOTAB: lnotab_line, LINETABLE_310: linetable310_line, LOCATIONS: locations_line}


@functools.lru_cache(maxsize=1 << 16)
def line_of(fmt: str, table: bytes, first: int, unit: Optional[int]) -> Optional[int]:
    """The line of code unit `unit` (None: the frame has not started: its
    first line). Cached: a hot loop's frames ask for the same few units of
    the same table every sample, and a table is decoded from its start."""
    if unit is None:
        return first
    return _DECODERS[fmt](table, first, unit)
