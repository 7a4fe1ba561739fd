"""The row format shared with the kernel walker (bpf/unwind.h), and the
table object build_rows returns.

A row is `struct unwind_row` packed little endian: u32 pc (link-time
address), s16 cfa_off, u8 cfa_type, s8 rbp_off8. Rows are sorted by pc and
each one holds up to the next row's pc."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

# enum unwind_cfa
UNW_CFA_UNKNOWN = 0
UNW_CFA_RSP = 1
UNW_CFA_RBP = 2
UNW_CFA_PLT = 3
UNW_CFA_SIGNAL = 4
UNW_CFA_END = 5
UNW_CFA_UNSUPPORTED = 6
UNW_RBP_LOST = -128

CFA_NAMES = {UNW_CFA_UNKNOWN: "unknown", UNW_CFA_RSP: "rsp", UNW_CFA_RBP: "rbp", UNW_CFA_PLT: "plt",
             UNW_CFA_SIGNAL: "signal", UNW_CFA_END: "end", UNW_CFA_UNSUPPORTED: "unsupported"}

ROW = struct.Struct("<IhBb")
ROW_SIZE = ROW.size            # 8, as the kernel's struct
PC_MAX = 0xFFFFFFFF

# (cfa_type, cfa_off, rbp_off8): what a row says, without its pc
Rule = Tuple[int, int, int]
UNKNOWN_RULE: Rule = (UNW_CFA_UNKNOWN, 0, 0)
UNSUPPORTED_RULE: Rule = (UNW_CFA_UNSUPPORTED, 0, 0)


def iter_rows(rows: bytes) -> Iterator[Tuple[int, int, int, int]]:
    """(pc, cfa_off, cfa_type, rbp_off8) of each packed row."""
    return ROW.iter_unpack(rows)


@dataclass
class UnwindTable:
    """Rows of one binary. An empty table carries in `reason` why there is
    none (no CFI, corrupt ELF, child timed out, ...); `stats` counts what
    the build met (FDEs, rows per CFA type, unsupported rules, dropped pcs)."""
    rows: bytes = b""
    stats: Dict[str, int] = field(default_factory=dict)
    build_id: Optional[str] = None
    reason: Optional[str] = None

    @property
    def n_rows(self) -> int:
        return len(self.rows) // ROW_SIZE

    def __bool__(self) -> bool:
        return bool(self.rows)
