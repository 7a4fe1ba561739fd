"""Reference of the kernel walker, in Python: find a row, take one step.

Used by tests and to debug a walk, never on the collection path. What one
step does (bpf/unwind.h is the layout; this is the behaviour):
- the pc's mapping gives its link-time address pc - bias; a return address
  (every frame but the first and one resumed by a signal) is looked up at
  pc - 1, so a call that ends its function finds that function's row;
- the row is the last one whose pc <= that address; none, or no table for
  the mapping: UNKNOWN, i.e. frame pointers (CFA = rbp + 16, rbp = [rbp]);
- RSP/RBP: CFA = rsp/rbp + cfa_off; PLT: CFA = rsp + 8, + 8 when
  (pc & 15) >= cfa_off; the return address is [CFA - 8], the caller's rsp
  is the CFA, its rbp is [CFA + 8 * rbp_off8] (unchanged when 0, lost
  when UNW_RBP_LOST: a later RBP or frame-pointer step then stops);
- SIGNAL: rsp points at the ucontext: rbp, rsp, rip from its mcontext;
- END stops the walk as complete, as does a zero return address;
  UNSUPPORTED, a failed read or a CFA not above rsp stops it incomplete.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

from .rows import (PC_MAX, ROW, ROW_SIZE, UNW_CFA_END, UNW_CFA_PLT, UNW_CFA_RBP, UNW_CFA_RSP,
                   UNW_CFA_SIGNAL, UNW_CFA_UNKNOWN, UNW_CFA_UNSUPPORTED, UNW_RBP_LOST)

UNWIND_MAX_NATIVE = 128
UNW_F_COMPLETE, UNW_F_TRUNCATED, UNW_F_FP_USED, UNW_F_READ_FAIL = 1, 2, 4, 8

# struct ucontext on x86-64: uc_flags, uc_link, uc_stack (24 bytes), then
# uc_mcontext.gregs[REG_R8 ...]: REG_RBP = 10, REG_RSP = 15, REG_RIP = 16
_UC_GREGS = 40
UC_RBP, UC_RSP, UC_RIP = _UC_GREGS + 8 * 10, _UC_GREGS + 8 * 15, _UC_GREGS + 8 * 16


class Regs(NamedTuple):
    pc: int
    sp: int
    bp: Optional[int]        # None: restored by a rule the walker cannot follow
    exact: bool = True       # pc is where the thread is, not a return address


class Mapping(NamedTuple):
    bias: int                # link-time address = pc - bias
    rows: bytes              # b"": no table, frame pointers


MappingFor = Callable[[int], Optional[Mapping]]
ReadU64 = Callable[[int], Optional[int]]


def find_row(rows: bytes, pc: int) -> Optional[Tuple[int, int, int, int]]:
    """(pc, cfa_off, cfa_type, rbp_off8) of the last row at or below pc."""
    lo, hi = 0, len(rows) // ROW_SIZE
    while lo < hi:
        mid = (lo + hi) // 2
        if ROW.unpack_from(rows, mid * ROW_SIZE)[0] <= pc:
            lo = mid + 1
        else:
            hi = mid
    return ROW.unpack_from(rows, (lo - 1) * ROW_SIZE) if lo else None


def row_for(regs: Regs, mapping: Optional[Mapping]) -> Optional[Tuple[int, int, int, int]]:
    """The row a step uses for this frame (None: frame pointers)."""
    if mapping is None or not mapping.rows:
        return None
    addr = regs.pc - mapping.bias - (0 if regs.exact else 1)
    return find_row(mapping.rows, addr) if 0 <= addr <= PC_MAX else None


def step(regs: Regs, mapping_for: MappingFor, read_u64: ReadU64) -> Tuple[Optional[Regs], str]:
    """The caller's registers and how they were found ("rsp", "rbp", "plt",
    "signal", "fp"), or None and why the walk stops ("end", "zero",
    "unsupported", "rbp_lost", "read", "no_progress")."""
    mapping = mapping_for(regs.pc)
    row = row_for(regs, mapping)
    kind = row[2] if row else UNW_CFA_UNKNOWN
    if kind == UNW_CFA_END:
        return None, "end"
    if kind == UNW_CFA_UNSUPPORTED:
        return None, "unsupported"
    if kind == UNW_CFA_SIGNAL:
        pc, sp, bp = read_u64(regs.sp + UC_RIP), read_u64(regs.sp + UC_RSP), read_u64(regs.sp + UC_RBP)
        if pc is None or sp is None or bp is None:
            return None, "read"
        return (Regs(pc, sp, bp, True), "signal") if pc else (None, "zero")
    if kind == UNW_CFA_UNKNOWN:
        if not regs.bp:
            return None, "rbp_lost"
        cfa, how = regs.bp + 16, "fp"
    elif kind == UNW_CFA_RSP:
        cfa, how = regs.sp + row[1], "rsp"
    elif kind == UNW_CFA_RBP:
        if regs.bp is None:
            return None, "rbp_lost"
        cfa, how = regs.bp + row[1], "rbp"
    elif kind == UNW_CFA_PLT:
        cfa, how = regs.sp + 8 + (8 if ((regs.pc - mapping.bias) & 15) >= row[1] else 0), "plt"
    else:
        return None, "unsupported"
    if cfa <= regs.sp:
        return None, "no_progress"
    ra = read_u64(cfa - 8)
    if ra is None:
        return None, "read"
    if kind == UNW_CFA_UNKNOWN:
        bp = read_u64(regs.bp)
    elif row[3] == 0:
        bp = regs.bp
    elif row[3] == UNW_RBP_LOST:
        bp = None
    else:
        bp = read_u64(cfa + 8 * row[3])
        if bp is None:
            return None, "read"
    if ra == 0:
        return None, "zero"
    return Regs(ra, cfa, bp, False), how


def walk(regs: Regs, mapping_for: MappingFor, read_u64: ReadU64,
         max_frames: int = UNWIND_MAX_NATIVE) -> Tuple[List[int], int, List[str]]:
    """pcs of the whole stack, innermost first, its UNW_F_* flags, and how
    each step went (the last entry: why it stopped)."""
    pcs, flags, hows = [regs.pc], 0, []
    while True:
        nxt, how = step(regs, mapping_for, read_u64)
        hows.append(how)
        if how == "fp":
            flags |= UNW_F_FP_USED
        if nxt is None:
            if how in ("end", "zero"):
                flags |= UNW_F_COMPLETE
            elif how == "read":
                flags |= UNW_F_READ_FAIL
            return pcs, flags, hows
        if len(pcs) == max_frames:
            return pcs, flags | UNW_F_TRUNCATED, hows
        pcs.append(nxt.pc)
        regs = nxt


def bias_of(start: int, file_offset: int, segments) -> Optional[int]:
    """Bias of a file mapping at `start` mapping `file_offset`, from the
    binary's PT_LOAD segments [(p_offset, p_filesz, p_vaddr)]."""
    for off, size, vaddr in segments:
        if off <= file_offset < off + max(size, 1):
            return start - (file_offset - off + vaddr)
    return None
