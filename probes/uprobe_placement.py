"""Where to put each TLS uprobe in one libssl file.

A uprobe whose instruction the kernel must single-step costs ~15 us per hit
on a VM (the trap leaves the guest); one the kernel emulates (call/jmp/jcc
rel, push reg, nop) costs ~0.4 us. Debian's SSL_read/SSL_write start with
`sub $N,%rsp` (single-stepped), but they and their _ex forms all call one
internal function (OpenSSL's ssl_read_internal / ssl_write_internal:
(SSL *s, void *buf, size_t num, size_t *count), > 0 on success, the bytes in
*count) whose first instruction is a push. So one entry + return pair there
covers both exported calls, cheaply.

The rules, checked by decoding the instructions with capstone:
- the internal function is the target of the first direct call (or tail jmp)
  on the straight-line path of the _ex function, with rdi, rsi and rcx
  untouched before it (that proves its convention: the _ex one);
- SSL_read/SSL_write are covered by it when they call the same target with
  rdi, rsi untouched and rcx pointing into their own stack (their count);
- a return probe goes where [rsp] still holds the return address: the
  function's first instruction, or the first after an endbr64;
- an entry-only probe goes on the first emulated instruction of the
  straight-line path from the entry, with the registers its program reads
  untouched (SSL_free's `test %rdi,%rdi; je` -> the je);
- anything else keeps the exported entry, attached by name. Whatever fails
  (no symbols, a truncated file, bytes that do not decode) falls back with a
  reason, never an exception.

The agent runs place() in a child (place_in_child): capstone and its
decoder tables cost the process that imports them ~10 MiB for good, and
placement is needed only once per libssl file.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from collector.symbolize.elf import load_segments

log = logging.getLogger("otelbpf.probes.uprobe_placement")

CHILD_TIMEOUT_S = 30.0
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_INSNS = 24          # straight-line instructions decoded from an entry at most
CODE_BYTES = 128        # bytes read at each entry (enough for MAX_INSNS prologue instructions)
# push reg is emulated since Linux 5.9 ("uprobes/x86: emulate push insns":
# Debian's 5.10, 6.1 and 6.12 all have push_emulate_op in /proc/kallsyms);
# call/jmp/jcc rel and the one-byte nop for longer. 5-byte nops are
# emulated (optimized) on 6.18 as measured here; older kernels: assume not.
PUSH_EMULATED_SINCE = (5, 9)
NOPL_EMULATED_SINCE = (6, 18)

_FAMILIES = {
    "rdi": ("rdi", "edi", "di", "dil"), "rsi": ("rsi", "esi", "si", "sil"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"), "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rsp": ("rsp", "esp", "sp", "spl"),
}
_FAMILY_OF = {name: fam for fam, names in _FAMILIES.items() for name in names}


def kernel_version(release: Optional[str] = None) -> Tuple[int, int]:
    release = release or os.uname().release
    try:
        major, minor = release.split("-", 1)[0].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)


@dataclass
class Site:
    """One uprobe: at a file offset, or (fallback) at an exported symbol."""
    covers: Tuple[str, ...]          # exported functions whose calls it sees
    offset: Optional[int] = None     # file offset; None: attach by name at covers[0]
    kind: str = ""                   # "push, emulated", "sub, single-stepped"
    where: str = "entry"             # "internal 0x35290", "entry", "entry+3"
    reason: str = ""                 # why it is not a cheaper place

    @property
    def emulated(self) -> bool:
        return self.kind.endswith(", emulated")

    def describe(self) -> str:
        s = f"{'/'.join(self.covers)} -> {self.where} ({self.kind or 'not decoded'})"
        return s + (f" [{self.reason}]" if self.reason else "")


@dataclass
class LibraryPlacement:
    path: str
    sites: Dict[str, Site] = field(default_factory=dict)   # group -> site: "read", "write", SSL_* names
    reason: str = ""                                       # why nothing was decoded at all

    def summary(self) -> str:
        name = os.path.basename(self.path)
        if self.reason:
            return f"TLS {name}: exported entries ({self.reason})"
        merged: Dict[str, List[str]] = {}     # same place and kind: one entry, the names joined
        for s in self.sites.values():
            merged.setdefault(s.describe().split(" -> ", 1)[1], []).append("/".join(s.covers))
        return f"TLS {name}: " + "; ".join(f"{', '.join(fs)} -> {where}" for where, fs in merged.items())


class _Code:
    """Exported symbols and instruction bytes of one ELF file."""

    def __init__(self, path: str, symbols: Dict[str, int]):
        self.path, self.symbols = path, symbols
        self.segments = load_segments(path)   # (file offset, file size, vaddr)

    def offset_of(self, vaddr: int) -> Optional[int]:
        for off, size, va in self.segments:
            if va <= vaddr < va + size:
                return vaddr - va + off
        return None

    def read(self, vaddr: int) -> bytes:
        off = self.offset_of(vaddr)
        if off is None:
            return b""
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(CODE_BYTES)


def function_symbols(path: str, names) -> Dict[str, int]:
    """Addresses (ELF virtual) of the named functions, from the dynamic and
    full symbol tables (pyelftools: a stripped libssl keeps .dynsym). Raises
    OSError or ELFError when the file cannot be read as ELF."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    wanted, found = set(names), {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for sec in elf.iter_sections():
            if not isinstance(sec, SymbolTableSection):
                continue
            for sym in sec.iter_symbols():
                # versioned names (SSL_read@@OPENSSL_3.0.0) are the bare name here
                if (sym.name in wanted and sym.name not in found and sym["st_value"] and
                        sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC")):
                    found[sym.name] = sym["st_value"]
    return found


class Decoder:
    def __init__(self, kernel: Tuple[int, int]):
        import capstone
        from capstone import x86
        self.cs, self.x86 = capstone, x86
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self.kernel = kernel

    def straight_line(self, code: bytes, addr: int) -> list:
        """Instructions from addr, following fall-through, up to the first
        unconditional transfer (included) or what does not decode."""
        out = []
        for insn in self.md.disasm(code, addr):
            out.append(insn)
            if len(out) >= MAX_INSNS or self._ends(insn):
                break
        return out

    def _ends(self, insn) -> bool:
        cs = self.cs
        if insn.group(cs.CS_GRP_RET) or insn.group(cs.CS_GRP_INT) or insn.mnemonic in ("hlt", "ud2"):
            return True
        return insn.group(cs.CS_GRP_JUMP) and insn.mnemonic == "jmp" or insn.group(cs.CS_GRP_CALL) and \
            not self.direct_target(insn)

    def direct_target(self, insn) -> Optional[int]:
        """The target of a call/jmp rel32 (plain opcode, no prefix), else None."""
        op = insn.bytes[0]
        if insn.mnemonic in ("call", "jmp") and op in (0xE8, 0xE9, 0xEB):
            return insn.operands[0].imm
        return None

    def kind(self, insn) -> str:
        """'<mnemonic>, emulated' or '<mnemonic>, single-stepped' for this kernel."""
        b = bytes(insn.bytes)
        emulated = False
        if b[0] in (0xE8, 0xE9, 0xEB) or 0x70 <= b[0] <= 0x7F or (b[0] == 0x0F and len(b) > 1 and
                                                                   0x80 <= b[1] <= 0x8F):
            emulated = True                                   # call/jmp/jcc rel, no prefix
        elif b == b"\x90":
            emulated = True
        elif 0x50 <= b[0] <= 0x57 or (len(b) == 2 and b[0] in (0x41,) and 0x50 <= b[1] <= 0x57):
            emulated = self.kernel >= PUSH_EMULATED_SINCE     # push reg
        elif b[:2] == b"\x0f\x1f" or b[:3] == b"\x66\x0f\x1f":
            emulated = self.kernel >= NOPL_EMULATED_SINCE
        return f"{insn.mnemonic}, {'emulated' if emulated else 'single-stepped'}"

    def writes(self, insn) -> set:
        """Register families (rdi, rsi, rdx, rcx, rsp) the instruction writes."""
        try:
            _read, written = insn.regs_access()
        except self.cs.CsError:
            return set(_FAMILIES)
        return {_FAMILY_OF[n] for n in (insn.reg_name(r) for r in written) if n in _FAMILY_OF}

    def writes_memory(self, insn) -> bool:
        return any(op.type == self.x86.X86_OP_MEM and op.access & self.cs.CS_AC_WRITE for op in insn.operands)

    def is_stack_address_into(self, insn, family: str) -> bool:
        """mov %rsp,%reg or lea d(%rsp),%reg: a pointer into the caller's frame."""
        x86 = self.x86
        ops = insn.operands
        if len(ops) != 2 or ops[0].type != x86.X86_OP_REG or _FAMILY_OF.get(insn.reg_name(ops[0].reg)) != family:
            return False
        if insn.mnemonic == "mov" and ops[1].type == x86.X86_OP_REG:
            return insn.reg_name(ops[1].reg) == "rsp"
        if insn.mnemonic == "lea" and ops[1].type == x86.X86_OP_MEM:
            return insn.reg_name(ops[1].mem.base) == "rsp" and not ops[1].mem.index
        return False


def _call_target(dec: Decoder, code: _Code, func: str, stack_count: bool) -> Tuple[Optional[int], str]:
    """(target of func's first direct call/tail jmp, '') when rdi and rsi
    reach it untouched and rcx is untouched (or, with stack_count, points
    into func's frame); else (None, why not)."""
    addr = code.symbols.get(func)
    if addr is None:
        return None, f"no {func}"
    insns = dec.straight_line(code.read(addr), addr)
    if not insns:
        return None, f"{func} does not decode"
    bad = set()
    for insn in insns:
        target = dec.direct_target(insn)
        if target is not None:
            if bad:
                return None, f"{func} changes {'/'.join(sorted(bad))} before its call"
            return target, ""
        w = dec.writes(insn) & {"rdi", "rsi", "rcx"}
        if stack_count and w == {"rcx"} and dec.is_stack_address_into(insn, "rcx"):
            continue
        bad |= w
    return None, f"no direct call in {func}'s first instructions"


def _return_site(dec: Decoder, code: _Code, addr: int) -> Tuple[Optional[int], str]:
    """Where an entry + return probe pair can go in the function at addr:
    its first instruction, or the first after an endbr64 ([rsp] is still the
    return address). (vaddr, kind) or (None, kind of the entry)."""
    insns = dec.straight_line(code.read(addr), addr)
    if not insns:
        return None, ""
    first = insns[1] if insns[0].mnemonic == "endbr64" and len(insns) > 1 else insns[0]
    kind = dec.kind(first)
    if kind.endswith("emulated"):
        return first.address, kind
    return None, dec.kind(insns[0])


def _entry_only_site(dec: Decoder, code: _Code, addr: int, needs: set) -> Tuple[Optional[int], str]:
    """The first emulated instruction on the straight-line path from addr
    that every call reaches with the registers in `needs` untouched (a jcc
    itself qualifies: it runs on every path). (vaddr, kind) or (None, kind
    of the entry)."""
    insns = dec.straight_line(code.read(addr), addr)
    if not insns:
        return None, ""
    for insn in insns:
        kind = dec.kind(insn)
        if kind.endswith("emulated"):
            return insn.address, kind
        if dec.writes(insn) & needs or insn.group(dec.cs.CS_GRP_JUMP) or insn.group(dec.cs.CS_GRP_CALL):
            break
    return None, dec.kind(insns[0])


# (group, the _ex function proving the internal convention, the plain one it may also cover)
IO_GROUPS = (("read", "SSL_read_ex", "SSL_read"), ("write", "SSL_write_ex", "SSL_write"))
RETURN_PROBED = ("SSL_do_handshake",)
ENTRY_ONLY = {"SSL_set_fd": {"rdi", "rsi"}, "SSL_free": {"rdi"}}
ALL_FUNCS = tuple(f for g in IO_GROUPS for f in g[1:]) + RETURN_PROBED + tuple(ENTRY_ONLY)


def _fallback(path: str, reason: str) -> LibraryPlacement:
    lp = LibraryPlacement(path, reason=reason)
    for f in ALL_FUNCS:
        lp.sites[f] = Site((f,), reason=reason)
    return lp


def place(path: str, kernel: Optional[Tuple[int, int]] = None,
          symbols: Optional[Dict[str, int]] = None) -> LibraryPlacement:
    """The uprobe sites for one libssl file; never raises."""
    kernel = kernel or kernel_version()
    try:
        dec = Decoder(kernel)
    except ImportError as e:
        return _fallback(path, f"capstone unavailable: {e}")
    try:
        code = _Code(path, symbols if symbols is not None else function_symbols(path, ALL_FUNCS))
        if not code.segments:
            return _fallback(path, "no ELF program headers")
        return _place(dec, code)
    except Exception as e:  # a corrupt file (ELFError, struct.error...): the entries by name still work
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return _fallback(path, f"not decoded: {first}")


def _place(dec: Decoder, code: _Code) -> LibraryPlacement:
    lp = LibraryPlacement(code.path)
    if not any(f in code.symbols for f in ALL_FUNCS):
        return _fallback(code.path, "none of the SSL functions found")
    for group, ex, plain in IO_GROUPS:
        target, why = _call_target(dec, code, ex, stack_count=False)
        covers: List[str] = []
        if target is not None:
            site, kind = _return_site(dec, code, target)
            if site is not None:
                covers.append(ex)
                p_target, _ = _call_target(dec, code, plain, stack_count=True)
                if p_target == target:
                    covers.append(plain)
                lp.sites[group] = Site(tuple(covers), code.offset_of(site), kind,
                                       f"internal {target:#x}" + (f"+{site - target}" if site != target else ""))
            else:
                why = f"internal {target:#x} starts with {kind}"
        for f in (ex, plain):
            if f in covers or f not in code.symbols:
                continue
            site, kind = _return_site(dec, code, code.symbols[f])
            if site is not None:
                lp.sites[f] = Site((f,), code.offset_of(site), kind, _at(code, f, site))
            else:
                lp.sites[f] = Site((f,), None, kind, "entry", why)
    for f in RETURN_PROBED:
        if f in code.symbols:
            site, kind = _return_site(dec, code, code.symbols[f])
            lp.sites[f] = Site((f,), code.offset_of(site) if site is not None else None, kind,
                               _at(code, f, site))
    for f, needs in ENTRY_ONLY.items():
        if f in code.symbols:
            site, kind = _entry_only_site(dec, code, code.symbols[f], needs)
            lp.sites[f] = Site((f,), code.offset_of(site) if site is not None else None, kind,
                               _at(code, f, site))
    return lp


def _at(code: _Code, func: str, site: Optional[int]) -> str:
    delta = 0 if site is None else site - code.symbols[func]
    return "entry" if not delta else f"entry+{delta}"


def place_in_child(path: str, timeout: float = CHILD_TIMEOUT_S) -> LibraryPlacement:
    """place(path) in `python -m probes.uprobe_placement`; never raises: a
    child that fails gives the exported entries, with why."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run([sys.executable, "-m", "probes.uprobe_placement", path], env=env, cwd="/",
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return _fallback(path, f"placement child failed: {e}")
    if out.returncode != 0:
        last = (out.stderr.decode(errors="replace").strip().splitlines() or [""])[-1][:200]
        return _fallback(path, f"placement child exited {out.returncode}: {last}")
    try:
        return from_json(path, out.stdout)
    except (ValueError, KeyError, TypeError) as e:
        return _fallback(path, f"placement child's answer unreadable: {e}")


def to_json(lp: LibraryPlacement) -> str:
    return json.dumps({"reason": lp.reason, "sites": {g: asdict(s) for g, s in lp.sites.items()}})


def from_json(path: str, text) -> LibraryPlacement:
    """The child's answer; raises ValueError/KeyError/TypeError when it is not one."""
    d = json.loads(text)
    lp = LibraryPlacement(path, reason=str(d["reason"]))
    for group, s in d["sites"].items():
        if group not in ALL_FUNCS and group not in {g[0] for g in IO_GROUPS}:
            raise ValueError(f"unknown site group {group!r}")
        offset = s["offset"]
        if offset is not None and (type(offset) is not int or offset < 0):
            raise ValueError(f"bad offset {offset!r}")
        lp.sites[group] = Site(tuple(str(c) for c in s["covers"]), offset, str(s["kind"]), str(s["where"]),
                               str(s["reason"]))
    return lp


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m probes.uprobe_placement <libssl path>")
    print(to_json(place(sys.argv[1])))
