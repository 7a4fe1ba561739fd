"""Where a binary's symbols are: its own .symtab, else a separate debug file
(by build id, then by .gnu_debuglink with its CRC checked), else
MiniDebugInfo; .dynsym is always merged in. Paths are looked up under the
process's root first so container binaries find their own debug files."""
from __future__ import annotations

import logging
import os
import struct
import zlib
from typing import List, Optional

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elf_symbols import RawSymbol, SymbolTable, minidebuginfo_symbols, read_function_symbols

log = logging.getLogger("otelbpf.symbolize")
DEBUG_ROOT = "/usr/lib/debug"
_ERRORS = (OSError, ELFError, ValueError, struct.error, EOFError, AttributeError, KeyError, TypeError)


def _crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def debuglink(elf: ELFFile) -> Optional[tuple]:
    """(file name, CRC32) from .gnu_debuglink."""
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    data = sec.data()
    nul = data.find(b"\0")
    if nul <= 0:
        return None
    crc_at = (nul + 4) & ~3
    if crc_at + 4 > len(data):
        return None
    crc, = struct.unpack(("<" if elf.little_endian else ">") + "I", data[crc_at:crc_at + 4])
    return os.fsdecode(data[:nul]), crc


def debug_file_candidates(path: str, build_id: Optional[str], link: Optional[tuple], root: str = "") -> List[tuple]:
    """(candidate path, CRC to check or None), in the order gdb and perf try them."""
    out = []
    roots = [root, ""] if root else [""]
    if build_id and len(build_id) > 2:
        for r in roots:
            out.append((f"{r}{DEBUG_ROOT}/.build-id/{build_id[:2]}/{build_id[2:]}.debug", None))
    if link:
        name, crc = link
        d = os.path.dirname(path)
        for r in roots:
            out += [(f"{r}{d}/{name}", crc), (f"{r}{d}/.debug/{name}", crc), (f"{r}{DEBUG_ROOT}{d}/{name}", crc)]
    return out


def _symtab_of(path: str) -> List[RawSymbol]:
    with open(path, "rb") as f:
        return read_function_symbols(ELFFile(f), ".symtab")


def load_table(open_path: str, path: str, build_id: Optional[str], root: str = "") -> Optional[SymbolTable]:
    """The symbol table of the binary readable at open_path (e.g. through
    /proc/PID/map_files), known to its process as path. None when it is no
    readable ELF: the frame then keeps its address and mapping."""
    try:
        with open(open_path, "rb") as f:
            elf = ELFFile(f)
            dynsym = read_function_symbols(elf, ".dynsym")
            symtab = read_function_symbols(elf, ".symtab")
            link = debuglink(elf) if not symtab else None
    except _ERRORS as e:
        log.debug("%s: no symbols (%s)", path, e)
        return None
    sources = [".dynsym"] if dynsym else []
    if symtab:
        sources.append(".symtab")
        return SymbolTable(symtab + dynsym, tuple(sources))
    for cand, crc in debug_file_candidates(path, build_id, link, root):
        try:
            if not os.path.isfile(cand) or (crc is not None and _crc32_of(cand) != crc):
                continue
            extra = _symtab_of(cand)
        except _ERRORS as e:
            log.debug("%s: debug file %s unusable (%s)", path, cand, e)
            continue
        if extra:
            return SymbolTable(extra + dynsym, tuple(sources + [cand]))
    try:
        with open(open_path, "rb") as f:
            mini = minidebuginfo_symbols(ELFFile(f))
    except _ERRORS:
        mini = []
    if mini:
        return SymbolTable(mini + dynsym, tuple(sources + [".gnu_debugdata"]))
    return SymbolTable(dynsym, tuple(sources))
