"""One line of a decoded DWARF CFI table (pyelftools' get_decoded()) -> the
rule of one unwind row, or the reason the kernel walker cannot follow it.

x86-64 DWARF registers: rbp = 6, rsp = 7, return address = 16. The walker
knows only CFA = rsp/rbp + offset, the PLT stub expression, and rbp saved at
a multiple of 8 from the CFA; the return address must be at CFA-8."""
from __future__ import annotations

from typing import Optional, Tuple

from elftools.dwarf.callframe import RegisterRule
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.dwarf.structs import DWARFStructs

from .rows import (UNSUPPORTED_RULE, UNW_CFA_END, UNW_CFA_PLT, UNW_CFA_RBP, UNW_CFA_RSP,
                   UNW_RBP_LOST, Rule)

REG_RBP, REG_RSP, REG_RA = 6, 7, 16

# The expression GNU ld writes for .plt entries (16 bytes each): after the
# entry's `push`, at (pc & 15) >= N, the CFA is 8 bytes further up.
_PLT_PREFIX = (("DW_OP_breg7", [8]), ("DW_OP_breg16", [0]), ("DW_OP_lit15", []), ("DW_OP_and", []))
_PLT_SUFFIX = (("DW_OP_ge", []), ("DW_OP_lit3", []), ("DW_OP_shl", []), ("DW_OP_plus", []))

_parser = DWARFExprParser(DWARFStructs(little_endian=True, dwarf_format=32, address_size=8))


def plt_threshold(expr) -> Optional[int]:
    """N when expr (bytes of a DW_CFA_def_cfa_expression) is the PLT
    expression with DW_OP_litN as its threshold, else None."""
    try:
        ops = [(op.op_name, list(op.args)) for op in _parser.parse_expr(expr)]
    except Exception:     # a malformed expression is just not the PLT one
        return None
    if len(ops) != 9 or tuple(ops[:4]) != _PLT_PREFIX or tuple(ops[5:]) != _PLT_SUFFIX:
        return None
    name, args = ops[4]
    if not name.startswith("DW_OP_lit") or args:
        return None
    n = int(name[len("DW_OP_lit"):])
    return n if n <= 15 else None


def rbp_rule(line: dict) -> int:
    """rbp_off8 of a row: 0 while rbp keeps the caller's value, n when it is
    saved at CFA + 8n; UNW_RBP_LOST for anything else. CFA+0 is lost too:
    0 already means 'unchanged'."""
    rule = line.get(REG_RBP)
    if rule is None or rule.type == RegisterRule.SAME_VALUE:
        return 0
    if rule.type == RegisterRule.OFFSET and rule.arg % 8 == 0 and rule.arg and -127 <= rule.arg // 8 <= 127:
        return rule.arg // 8
    return UNW_RBP_LOST


def line_rule(line: dict) -> Tuple[Rule, Optional[str]]:
    """(cfa_type, cfa_off, rbp_off8) for one decoded line, and the stats key
    of what made it unsupported (None when the walker can follow it)."""
    ra = line.get(REG_RA)
    if ra is not None and ra.type == RegisterRule.UNDEFINED:
        return (UNW_CFA_END, 0, 0), None
    if ra is None or ra.type != RegisterRule.OFFSET or ra.arg != -8:
        return UNSUPPORTED_RULE, "unsupported_ra"
    cfa = line["cfa"]
    if cfa.expr is not None:
        n = plt_threshold(cfa.expr)
        if n is None:
            return UNSUPPORTED_RULE, "unsupported_cfa_expr"
        return (UNW_CFA_PLT, n, rbp_rule(line)), None
    if cfa.reg == REG_RSP:
        kind = UNW_CFA_RSP
    elif cfa.reg == REG_RBP:
        kind = UNW_CFA_RBP
    else:
        return UNSUPPORTED_RULE, "unsupported_cfa_reg"
    if cfa.offset is None or not -0x8000 <= cfa.offset <= 0x7FFF:
        return UNSUPPORTED_RULE, "unsupported_cfa_off"
    return (kind, cfa.offset, rbp_rule(line)), None
