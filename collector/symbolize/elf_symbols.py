"""Function symbol tables of ELF files, compact and size-aware.

A table is four parallel arrays sorted by address (start, size, offset of
the name in one bytes blob) rather than a dict of objects: python3.11's
~10k functions then cost a few hundred KB, not megabytes. Entries are read
with struct straight from the section data; pyelftools only finds sections.
"""
from __future__ import annotations

import bisect
import lzma
import struct
from array import array
from io import BytesIO
from typing import Iterable, List, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

STT_FUNC, STT_GNU_IFUNC = 2, 10
STB_GLOBAL, STB_WEAK = 1, 2
SHN_UNDEF = 0
PLT_ENTRY = 16
MAX_SYMBOLS = 2_000_000       # a corrupt sh_size must not make us allocate without bound
MAX_DEBUGDATA = 64 << 20      # decompressed MiniDebugInfo cap

# (start, size, binding, name) as read from one symbol section
RawSymbol = Tuple[int, int, int, bytes]


def read_function_symbols(elf: ELFFile, section_name: str) -> List[RawSymbol]:
    """STT_FUNC / STT_GNU_IFUNC symbols with an address from one symbol section."""
    sec = elf.get_section_by_name(section_name)
    if sec is None or sec["sh_type"] == "SHT_NOBITS":
        return []
    strtab = elf.get_section(sec["sh_link"])
    if strtab is None:
        return []
    data, strs = sec.data(), strtab.data()
    end = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:
        fmt, entsize = end + "IBBHQQ", 24
    else:
        fmt, entsize = end + "IIIBBH", 16
    n = min(len(data) // entsize, MAX_SYMBOLS)
    out = []
    for ent in struct.iter_unpack(fmt, data[:n * entsize]):
        if elf.elfclass == 64:
            st_name, st_info, _other, shndx, value, size = ent
        else:
            st_name, value, size, st_info, _other, shndx = ent
        if (st_info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC) or not value:
            continue
        nul = strs.find(b"\0", st_name)
        name = strs[st_name:nul if nul >= 0 else len(strs)]
        if shndx == SHN_UNDEF:
            # an import with an address: its canonical PLT stub in a non-PIE
            # executable, named as perf names PLT entries
            name, size = name + b"@plt", PLT_ENTRY
        if name:
            out.append((value, size, st_info >> 4, name))
    return out


def minidebuginfo_symbols(elf: ELFFile) -> List[RawSymbol]:
    """The static functions Fedora-style MiniDebugInfo keeps: .gnu_debugdata
    is an xz-compressed ELF whose .symtab holds what .dynsym lacks."""
    sec = elf.get_section_by_name(".gnu_debugdata")
    if sec is None:
        return []
    try:
        dec = lzma.LZMADecompressor()
        inner = dec.decompress(sec.data(), max_length=MAX_DEBUGDATA)
        return read_function_symbols(ELFFile(BytesIO(inner)), ".symtab")
    except (lzma.LZMAError, ELFError, EOFError, ValueError, struct.error):
        return []


def _rank(sym: RawSymbol) -> tuple:
    """Which of several symbols at one address names it, as perf chooses:
    a sized one, a non-weak one, a global one, fewer leading underscores,
    then the longer name."""
    _start, size, bind, name = sym
    return (size > 0, bind != STB_WEAK, bind == STB_GLOBAL,
            -(len(name) - len(name.lstrip(b"_"))), len(name), name)


class SymbolTable:
    """Functions of one binary by virtual address. An address past the end of
    a sized symbol has no name (a static function is never named after the
    exported function before it); a zero-size symbol (assembly) covers up to
    the next one."""

    __slots__ = ("_starts", "_ends", "_name_off", "_names", "sources")

    def __init__(self, symbols: Iterable[RawSymbol], sources: Tuple[str, ...] = ()):
        best: dict = {}
        for sym in symbols:
            cur = best.get(sym[0])
            if cur is None or _rank(sym) > _rank(cur):
                best[sym[0]] = sym
        ordered = sorted(best.values())
        self._starts = array("Q")
        self._ends = array("Q")   # 0: zero-size, ends where the next symbol starts
        self._name_off = array("I")
        blob = bytearray()
        for start, size, _bind, name in ordered:
            self._starts.append(start)
            self._ends.append(start + size if size else 0)
            self._name_off.append(len(blob))
            blob += name
        self._name_off.append(len(blob))
        self._names = bytes(blob)
        self.sources = sources   # where the symbols came from, for logs and tests

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def nbytes(self) -> int:
        return (len(self._names) + self._starts.itemsize * len(self._starts) * 2
                + self._name_off.itemsize * len(self._name_off))

    def lookup(self, vaddr: int) -> Optional[bytes]:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        end = self._ends[i]
        if end and vaddr >= end:
            # Past a sized symbol: an enclosing bigger symbol may still cover
            # it (nested aliases); look back a little, never to a sized
            # symbol that ends before the address.
            for j in range(i - 1, max(-1, i - 8), -1):
                if self._ends[j] > vaddr:
                    return self._name(j)
            return None
        return self._name(i)

    def _name(self, i: int) -> bytes:
        return self._names[self._name_off[i]:self._name_off[i + 1]]
