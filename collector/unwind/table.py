"""build_rows: a binary's unwind rows (bpf/unwind.h) from its DWARF CFI.

pyelftools reads and decodes the CFI (.eh_frame first; .debug_frame of the
same file only adds functions .eh_frame lacks); rules.py turns each decoded
line into a row. Rows are sorted by pc, consecutive equal rules merged, and
an UNW_CFA_UNKNOWN row closes each FDE that the next one does not start at.
Whatever the input, the result is an UnwindTable: a damaged or unsupported
file gives an empty one whose `reason` says why, never an exception (running
out of memory or an I/O error too: those are `transient`, and the build
child never caches them)."""
from __future__ import annotations

import bisect
import collections
import io
import os
from typing import BinaryIO, List, Optional, Tuple, Union

from elftools.dwarf.callframe import FDE, CallFrameInfo
from elftools.dwarf.constants import DW_CFA
from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile

from .rows import (CFA_NAMES, PC_MAX, ROW, UNKNOWN_RULE, UNSUPPORTED_RULE, UNW_CFA_SIGNAL,
                   UNW_RBP_LOST, Rule, UnwindTable)
from .rules import line_rule

MAX_SECTION = 256 << 20       # a corrupt sh_size must not make us read without bound
OUT_OF_MEMORY = "out of memory"

# (start, end, [(pc, rule)]) of one FDE
Fde = Tuple[int, int, List[Tuple[int, Rule]]]


def build_rows(src: Union[str, os.PathLike, BinaryIO], build_id: Optional[str] = None) -> UnwindTable:
    """Unwind rows of the ELF file at path src, or in the binary file object
    src (e.g. io.BytesIO of the vdso)."""
    stats: collections.Counter = collections.Counter()
    try:
        if isinstance(src, (str, bytes, os.PathLike)):
            with open(src, "rb") as f:
                return _build(ELFFile(f), stats, build_id)
        return _build(ELFFile(src), stats, build_id)
    except MemoryError:
        pass    # answered below, once the traceback (and the parsed CFI it holds) is freed
    except OSError as e:         # gone (its process exited), unreadable: not the file's fault
        stats["io_errors"] += 1
        return UnwindTable(stats=dict(stats), build_id=build_id, reason=f"cannot read: {_short(e)}")
    except Exception as e:       # corrupt headers, truncated file
        stats["errors"] += 1
        return UnwindTable(stats=dict(stats), build_id=build_id, reason=f"unreadable ELF: {_short(e)}")
    # not the file's fault either: no table now, and nothing a cache should keep
    stats["out_of_memory"] += 1
    return UnwindTable(stats=dict(stats), build_id=build_id, reason=OUT_OF_MEMORY)


def transient(table: UnwindTable) -> bool:
    """The table is empty for a reason another try may not meet (memory, I/O)."""
    return bool(table.stats.get("out_of_memory") or table.stats.get("io_errors") or table.stats.get("transient"))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:200]


def _build(elf: ELFFile, stats: collections.Counter, build_id: Optional[str]) -> UnwindTable:
    if elf["e_machine"] != "EM_X86_64" or elf.elfclass != 64 or not elf.little_endian:
        stats["unsupported_file"] += 1
        return UnwindTable(stats=dict(stats), build_id=build_id, reason=f"unsupported machine {elf['e_machine']}")
    if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):   # a relocatable object's addresses are not final
        stats["unsupported_file"] += 1
        return UnwindTable(stats=dict(stats), build_id=build_id, reason=f"unsupported ELF type {elf['e_type']}")
    reasons = []
    eh, why = _section_fdes(elf, ".eh_frame", stats)
    if why:
        reasons.append(why)
    dbg, why = _section_fdes(elf, ".debug_frame", stats)
    if why:
        reasons.append(why)
    fdes = _without_overlaps(eh, stats, "overlap")
    stats["fdes"] = len(fdes)
    if dbg:
        extra = _outside(_without_overlaps(dbg, stats, "overlap_debug_frame"), fdes, stats)
        stats["fdes_debug_frame"] = len(extra)
        fdes = sorted(fdes + extra, key=lambda fde: fde[0])
    if not fdes:
        if not reasons:
            stats["no_cfi"] += 1
        return UnwindTable(stats=dict(stats), build_id=build_id, reason="; ".join(reasons) or "no CFI")
    rows = _pack(fdes, stats)
    return UnwindTable(rows=rows, stats=dict(stats), build_id=build_id,
                       reason="; ".join(reasons) or None)


def _section_fdes(elf: ELFFile, name: str, stats: collections.Counter) -> Tuple[List[Fde], Optional[str]]:
    """The FDEs of one CFI section, decoded to rows, and why there are none."""
    sec = elf.get_section_by_name(name)
    if sec is None or sec["sh_type"] == "SHT_NOBITS" or not sec["sh_size"]:
        return [], None
    if sec["sh_size"] > MAX_SECTION:
        stats["errors"] += 1
        return [], f"{name} too large"
    try:
        data = sec.data()
        cfi = CallFrameInfo(io.BytesIO(data), len(data), sec["sh_addr"],
                            DWARFStructs(little_endian=True, dwarf_format=32, address_size=8),
                            for_eh_frame=(name == ".eh_frame"))
        entries = cfi.get_entries()
    except MemoryError:
        raise
    except Exception as e:   # pyelftools parses the whole section at once
        stats["errors"] += 1
        return [], f"corrupt {name}: {_short(e)}"
    out = []
    for entry in entries:
        if isinstance(entry, FDE):
            fde = _fde_rows(entry, stats)
            if fde is not None:
                out.append(fde)
    return out, None


def _fde_rows(fde: FDE, stats: collections.Counter) -> Optional[Fde]:
    try:
        start = fde["initial_location"]
        end = start + fde["address_range"]
    except Exception:
        stats["decode_errors"] += 1
        return None
    if end <= start:
        stats["empty_fde"] += 1
        return None
    if b"S" in (fde.cie.header.get("augmentation") or b""):
        # a signal trampoline (glibc's __restore_rt): the walker reads the
        # interrupted registers from the ucontext, whatever the expressions say
        return start, end, [(start, (UNW_CFA_SIGNAL, 0, 0))]
    try:
        lines = _decoded_lines(fde)
    except MemoryError:
        raise
    except Exception:
        stats["decode_errors"] += 1
        return start, end, [(start, UNSUPPORTED_RULE)]
    rows: List[Tuple[int, Rule]] = []
    for line in lines:
        pc = line["pc"]
        if not start <= pc < end or (rows and pc < rows[-1][0]):
            stats["line_out_of_range"] += 1
            continue
        rule, why = line_rule(line)
        if why:
            stats[why] += 1
        if rows and rows[-1][0] == pc:
            rows[-1] = (pc, rule)       # several lines at one pc: the last one holds
        else:
            rows.append((pc, rule))
    if not rows:
        stats["fde_no_rules"] += 1
        rows = [(start, UNSUPPORTED_RULE)]
    return start, end, rows


def _decoded_lines(fde: FDE) -> list:
    # pyelftools 0.33 parses DW_CFA_GNU_args_size but its decoder rejects it;
    # it only tells exception handling how many argument bytes were pushed
    # and changes no rule, so it is left out before decoding.
    for entry in (fde.cie, fde):
        if any(i.opcode == DW_CFA.GNU_args_size for i in entry.instructions):
            entry.instructions = [i for i in entry.instructions if i.opcode != DW_CFA.GNU_args_size]
    return fde.get_decoded().table


def _without_overlaps(fdes: List[Fde], stats: collections.Counter, key: str) -> List[Fde]:
    """Sorted by start; an FDE starting inside the one before is dropped
    (two tables for one pc: neither can be trusted more, keep the first)."""
    out: List[Fde] = []
    for fde in sorted(fdes, key=lambda f: (f[0], f[1])):
        if out and fde[0] < out[-1][1]:
            stats[key] += 1
            continue
        out.append(fde)
    return out


def _outside(extra: List[Fde], base: List[Fde], stats: collections.Counter) -> List[Fde]:
    """The FDEs of `extra` (.debug_frame) that overlap none of `base` (.eh_frame)."""
    starts = [f[0] for f in base]
    out = []
    for fde in extra:
        i = bisect.bisect_left(starts, fde[1])     # base FDEs starting before fde's end
        if i > 0 and base[i - 1][1] > fde[0]:
            stats["debug_frame_covered"] += 1
            continue
        out.append(fde)
    return out


def _pack(fdes: List[Fde], stats: collections.Counter) -> bytes:
    rows: List[Tuple[int, Rule]] = []
    for i, (start, end, fde_rows) in enumerate(fdes):
        rows.extend(fde_rows)
        if i + 1 == len(fdes) or fdes[i + 1][0] != end:
            rows.append((end, UNKNOWN_RULE))
    out = bytearray()
    last: Optional[Rule] = None
    for pc, rule in rows:
        if pc > PC_MAX:
            stats["dropped_pc"] += 1
            continue
        if rule == last:
            continue
        last = rule
        out += ROW.pack(pc, rule[1], rule[0], rule[2])
        stats["rows"] += 1
        stats[CFA_NAMES[rule[0]]] += 1
        if rule[2] == UNW_RBP_LOST:
            stats["rbp_lost"] += 1
    return bytes(out)
