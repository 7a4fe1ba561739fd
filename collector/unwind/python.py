"""CPython frames in CPU profiles: user space's side of bpf/unwind_python.h.

detect(pid) finds a process's interpreter (a python3.X executable or
libpython3.X.so holding _PyRuntime in its .dynsym), its version and the
structure layout of that version, and gives the `struct py_proc` bytes the
walker reads from py_procs. PythonSymbolizer turns the walker's (code
object, instruction) pairs into function, file and line by reading the
process's memory. merge() puts those frames in place of the native
_PyEval_EvalFrameDefault frames they ran under.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..records import Frame
from ..symbolize.elf import load_segments
from ..symbolize.procmaps import MappingInfo, read_maps
from .lookup import bias_of
from .python_layouts import DEBUG_313_SIZE, TABLES, Layout, from_debug_offsets, version_of_hex
from .python_lines import line_of

log = logging.getLogger("otelbpf.unwind.python")

# bpf/unwind_python.h
PY_PAIR_ENTRY = 1 << 32
PY_PAIR_NO_INSTR = 1 << 33
PY_TID_NATIVE, PY_TID_PTHREAD = 1, 2
PY_NO_OFF = 0xFFFF
PY_PROC = struct.Struct("=QHBB12HI")   # struct py_proc, 40 bytes

FRAME_TYPE = "cpython"                 # profile.frame.type of a Python frame
EVAL_FRAME = "_PyEval_EvalFrameDefault"
_BINARY = re.compile(r"^(?:lib)?python(\d)\.(\d+)[a-z]*(?:\.so(?:\.[0-9.]+)?)?$")
_PY_VERSION = re.compile(rb"\x00(\d)\.(\d{1,2})\.\d{1,2}(?:(?:a|b|rc)\d+)?\+?\x00")
MAX_RODATA = 16 << 20
_logged: set = set()


@dataclass(frozen=True)
class PythonProcess:
    pid: int
    version: tuple      # (3, 11)
    binary: str         # the interpreter's path as the process sees it
    runtime: int        # address of _PyRuntime in the process
    layout: Layout
    tid_match: int      # PY_TID_*

    def pack(self) -> bytes:
        """struct py_proc for the py_procs map (key: the pid as u32)."""
        lo = self.layout
        tid = lo.tstate_native_thread_id if self.tid_match == PY_TID_NATIVE else lo.tstate_thread_id

        def off(v):
            return PY_NO_OFF if v is None else v
        return PY_PROC.pack(
            self.runtime, self.version[0] << 8 | self.version[1], lo.frames, self.tid_match,
            lo.runtime_interp_head, lo.interp_threads_head, lo.tstate_next, tid, lo.tstate_frame,
            off(lo.cframe_current), lo.frame_previous, lo.frame_code, lo.frame_instr,
            off(lo.frame_entry), off(lo.frame_owner), off(lo.code_adaptive), 0)


# ------------------------------------------------------------------ detection
def _candidates(pid: int) -> List[MappingInfo]:
    """Mappings that may hold the interpreter: libpython3.X first, then a
    python3.X executable, then the main executable (an embedding program)."""
    maps = read_maps(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    named = [m for m in maps if _BINARY.match(os.path.basename(m.path))]
    named.sort(key=lambda m: not os.path.basename(m.path).startswith("lib"))
    out, seen = [], set()
    for m in named + [m for m in maps if m.path == exe]:
        if m.path not in seen:
            seen.add(m.path)
            out.append(m)
    return out


def _section_bytes(elf: ELFFile, vaddr: int, size: int) -> Optional[bytes]:
    """`size` bytes of initialized data at link-time address vaddr."""
    for sec in elf.iter_sections():
        start, length = sec["sh_addr"], sec["sh_size"]
        if sec["sh_type"] == "SHT_NOBITS" or not start or not start <= vaddr < start + length:
            continue
        if vaddr + size > start + length:
            return None
        sec.stream.seek(sec["sh_offset"] + vaddr - start)
        data = sec.stream.read(size)
        return data if len(data) == size else None
    return None


def _symbols(elf: ELFFile, names: tuple) -> dict:
    out = {}
    for secname in (".dynsym", ".symtab"):
        sec = elf.get_section_by_name(secname)
        if sec is None or not hasattr(sec, "get_symbol_by_name"):
            continue
        for name in names:
            if name in out:
                continue
            found = sec.get_symbol_by_name(name)
            if found and found[0]["st_value"]:
                out[name] = found[0]["st_value"]
    return out


def _binary_version(elf: ELFFile, syms: dict) -> Optional[tuple]:
    """Py_Version (3.11+), else the one PY_VERSION string in .rodata."""
    if "Py_Version" in syms:
        raw = _section_bytes(elf, syms["Py_Version"], 4)
        if raw:
            return version_of_hex(struct.unpack("<I", raw)[0])
    sec = elf.get_section_by_name(".rodata")
    if sec is None or sec["sh_size"] > MAX_RODATA:
        return None
    # other x.y.z strings (library versions) sit there too: only 3.6+ counts
    found = {(int(a), int(b)) for a, b in _PY_VERSION.findall(sec.data())}
    found = {v for v in found if v[0] == 3 and v[1] >= 6}
    return found.pop() if len(found) == 1 else None


def _bias(via: str, m: MappingInfo) -> Optional[int]:
    return bias_of(m.start, m.file_offset, load_segments(via))


def _tid_match(pid: int, layout: Layout) -> int:
    """native_thread_id is the thread's id in its own pid namespace, the
    walker compares it with the initial namespace's: only equal when the
    process shares the agent's namespace (one NSpid entry)."""
    if layout.tstate_native_thread_id is None:
        return PY_TID_PTHREAD
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return PY_TID_NATIVE if len(line.split()) == 2 else PY_TID_PTHREAD
    except OSError:
        pass
    return PY_TID_PTHREAD


def _log_once(key, msg: str, *args) -> None:
    if key not in _logged:
        if len(_logged) > 4096:
            _logged.clear()
        _logged.add(key)
        log.info(msg, *args)


def detect(pid: int) -> Tuple[Optional[PythonProcess], str]:
    """(PythonProcess, "") for a CPython process the walker can read, else
    (None, reason): "not python: ...", "unsupported ...", "not ready: ..."
    (retry later) or "unreadable: ...". An unsupported interpreter is
    logged once per binary; its samples keep their native frames."""
    skipped = ""
    for m in _candidates(pid):
        via = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
        info = _interpreter_of(via, m)
        if info is None:
            continue
        if isinstance(info, str):
            if info.startswith("unreadable"):
                skipped = info   # a corrupt file: try the next candidate
                continue
            return None, info
        syms, version, layout, why = info
        if layout is None:
            _log_once((m.binary_key, why), "pid %d (%s): %s: native frames only", pid, m.path, why)
            return None, why
        bias = _bias(via, m)
        if bias is None:
            return None, f"unreadable: no segment of {m.path} maps offset {m.file_offset:#x}"
        proc = PythonProcess(pid, version, m.path, syms["_PyRuntime"] + bias, layout, _tid_match(pid, layout))
        why = _check_live(proc)
        if why.startswith("unsupported"):
            _log_once((m.binary_key, "layout"), "pid %d: %s: native frames only", pid, why)
        return (None, why) if why else (proc, "")
    return None, skipped or "not python: no interpreter with _PyRuntime mapped"


_interpreters: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def _interpreter_of(via: str, m: MappingInfo):
    """What a binary says about the interpreter in it, read once per binary
    (every sampled process is asked, most are not Python): None (no
    _PyRuntime), a reason string, or (symbols, version, layout, why)."""
    key = m.binary_key
    if key in _interpreters:
        return _interpreters[key]
    try:
        with open(via, "rb") as f:
            elf = ELFFile(f)
            syms = _symbols(elf, ("_PyRuntime", "Py_Version"))
            if "_PyRuntime" not in syms:
                info = None
            else:
                version = _binary_version(elf, syms)
                named = _BINARY.match(os.path.basename(m.path))
                if version is None and named:
                    version = (int(named.group(1)), int(named.group(2)))
                if version is None:
                    info = f"unsupported: no CPython version found in {m.path}"
                elif version >= (3, 13):
                    raw = _section_bytes(elf, syms["_PyRuntime"], DEBUG_313_SIZE)
                    layout, why = from_debug_offsets(raw or b"")
                    info = (syms, version, layout, why)
                else:
                    layout = TABLES.get(version)
                    info = (syms, version, layout, "" if layout else f"unsupported CPython {version[0]}.{version[1]}")
    except (OSError, ELFError, ValueError, struct.error) as e:
        return f"unreadable: {m.path}: {e}"   # not remembered: may be a process that just exited
    _interpreters[key] = info
    if len(_interpreters) > 1024:
        _interpreters.popitem(last=False)
    return info


def _check_live(proc: PythonProcess) -> str:
    """"" when the layout fits the live process: its first thread state
    points back at its interpreter (what a wrong table would not do)."""
    lo = proc.layout
    with ProcessMemory(proc.pid) as mem:
        interp = mem.u64(proc.runtime + lo.runtime_interp_head)
        if interp is None:
            return "unreadable: process memory"
        if not interp:
            return "not ready: interpreter not initialized yet"
        ts = mem.u64(interp + lo.interp_threads_head)
        if not ts:
            return "not ready: no thread state yet"
        if mem.u64(ts + lo.tstate_interp) != interp:
            return (f"unsupported: CPython {proc.version[0]}.{proc.version[1]} of {proc.binary} "
                    "does not match its layout table")
    return ""


def py_proc_bytes(pid: int) -> Tuple[Optional[bytes], str]:
    """The py_procs value for pid, or (None, reason)."""
    proc, why = detect(pid)
    return (proc.pack(), "") if proc else (None, why)


# ------------------------------------------------------------------ memory
class ProcessMemory:
    """Reads of another process's memory through /proc/PID/mem; a failed
    read (unmapped, process gone) is None, never an exception."""

    def __init__(self, pid: int):
        try:
            self._fd: Optional[int] = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def read(self, addr: int, size: int) -> Optional[bytes]:
        if self._fd is None or addr <= 0 or size < 0 or addr + size >= 1 << 63:
            return None
        try:
            data = os.pread(self._fd, size, addr)
        except OSError:
            return None
        return data if len(data) == size else None

    def u64(self, addr: int) -> Optional[int]:
        raw = self.read(addr, 8)
        return struct.unpack("<Q", raw)[0] if raw else None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


MAX_NAME = 4096          # characters of a name or file name
MAX_LINETABLE = 1 << 20


def read_str(mem: ProcessMemory, addr: int, lo: Layout) -> Optional[str]:
    """A compact str object (what code objects hold) at addr."""
    head = mem.read(addr, lo.unicode_ascii_size)
    if head is None:
        return None
    length, = struct.unpack_from("<q", head, 16)
    state, = struct.unpack_from("<I", head, 32)
    kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
    if not compact or kind not in (1, 2, 4) or not 0 <= length <= MAX_NAME:
        return None
    data = mem.read(addr + (lo.unicode_ascii_size if ascii_ else lo.unicode_compact_size), length * kind)
    if data is None:
        return None
    return data.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind], errors="replace")


def read_bytes(mem: ProcessMemory, addr: int, lo: Layout) -> Optional[bytes]:
    size = mem.u64(addr + 16)   # PyVarObject.ob_size
    if size is None or size > MAX_LINETABLE:
        return None
    return mem.read(addr + lo.bytes_sval, size)


# ------------------------------------------------------------------ resolver
@dataclass(frozen=True)
class CodeInfo:
    name: Optional[str]      # co_qualname (3.11+), co_name before
    filename: Optional[str]
    firstlineno: int
    linetable: bytes


_UNREADABLE = object()   # a code address that did not read as a code object


class PythonSymbolizer:
    """(pid, code object, instruction word) -> Frame with function, file and
    line, reading code objects from the live process; cached per (pid, code
    address) until forget(pid). A process that is gone, or an address that
    does not read as a code object, gives a frame with no function."""

    def __init__(self, max_codes: int = 65536):
        self._procs: dict = {}   # pid -> (Layout, ProcessMemory)
        self._codes: "collections.OrderedDict[tuple, CodeInfo]" = collections.OrderedDict()
        self._max_codes = max_codes
        self.unresolved = 0      # frames whose code object could not be read
        # (pid, code, word) -> (CodeInfo, process entry, Frame): samples share
        # most frames (a busy collection: 24k Python frames, 870 distinct);
        # one frozen Frame each instead of a copy per sample
        self._frames: dict = {}

    def track(self, proc: PythonProcess) -> None:
        old = self._procs.get(proc.pid)
        if old is not None and old[0] == proc.layout:
            return
        if old is not None:
            old[1].close()
        self._procs[proc.pid] = (proc.layout, ProcessMemory(proc.pid))

    def forget(self, pid: int) -> None:
        old = self._procs.pop(pid, None)
        if old is not None:
            old[1].close()
        for key in [k for k in self._codes if k[0] == pid]:
            del self._codes[key]
        for key in [k for k in self._frames if k[0] == pid]:
            del self._frames[key]

    def code_info(self, pid: int, code: int) -> Optional[CodeInfo]:
        key = (pid, code)
        info = self._codes.get(key)
        if info is not None:
            self._codes.move_to_end(key)
            return None if info is _UNREADABLE else info
        entry = self._procs.get(pid)
        if entry is None:
            return None
        lo, mem = entry
        info = self._read_code(mem, lo, code)
        # a failed read is remembered too: a process that exited, or an
        # address that is no code object, is not read again every sample
        self._codes[key] = _UNREADABLE if info is None else info
        if len(self._codes) > self._max_codes:
            self._codes.popitem(last=False)
        return info

    @staticmethod
    def _read_code(mem: ProcessMemory, lo: Layout, code: int) -> Optional[CodeInfo]:
        name_at = lo.code_qualname if lo.code_qualname is not None else lo.code_name
        ptrs = [mem.u64(code + off) for off in (name_at, lo.code_filename, lo.code_linetable)]
        first = mem.read(code + lo.code_firstlineno, 4)
        if None in ptrs or first is None:
            return None
        name = read_str(mem, ptrs[0], lo)
        if name is None:
            return None   # not a code object (or gone): nothing cached
        table = read_bytes(mem, ptrs[2], lo)
        return CodeInfo(name, read_str(mem, ptrs[1], lo), struct.unpack("<i", first)[0], table or b"")

    def resolve(self, pid: int, code: int, word: int) -> Frame:
        info = self.code_info(pid, code)
        if info is None:
            self.unresolved += 1
            return Frame(None, code, None, frame_type=FRAME_TYPE)
        entry = self._procs.get(pid)
        known = self._frames.get((pid, code, word))
        if known is not None and known[0] is info and known[1] is entry:
            return known[2]
        unit = None if word & PY_PAIR_NO_INSTR else word & 0xFFFFFFFF
        line = line_of(entry[0].lines, info.linetable, info.firstlineno, unit) if entry else None
        frame = Frame(info.name, code, None, file=info.filename, line=line or 0, frame_type=FRAME_TYPE)
        if len(self._frames) >= self._max_codes:
            self._frames.clear()
        self._frames[(pid, code, word)] = (info, entry, frame)
        return frame


# ------------------------------------------------------------------ merge
def pairs_of(slots, n_native: int, n_py: int) -> List[Tuple[int, int]]:
    """The Python pairs of a walked stack's slots (struct ustack)."""
    return [(slots[n_native + 2 * i], slots[n_native + 2 * i + 1]) for i in range(n_py)]


def is_eval_frame(f: Frame) -> bool:
    # a .cold part of the function (GCC's hot/cold split) counts as well
    return not f.kernel and f.frame_type is None and bool(f.function) and f.function.startswith(EVAL_FRAME)


def groups(pairs: List[Tuple[int, int]]) -> List[list]:
    """Pairs split per _PyEval_EvalFrameDefault call, innermost first; pairs
    after the last entry flag (a cut chain) form a last group."""
    out, cur = [], []
    for pair in pairs:
        cur.append(pair)
        if pair[1] & PY_PAIR_ENTRY:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def merge(native: List[Frame], pairs: List[Tuple[int, int]],
          resolve: Callable[[int, int], Frame]) -> List[Frame]:
    """Native frames (innermost first, symbolized) with each
    _PyEval_EvalFrameDefault frame replaced by the Python frames its call
    ran, innermost group first. Other native frames stay where they are.
    An eval frame with no group left stays native; groups left over (the
    native walk stopped early) go at the outermost end."""
    todo = groups(pairs)
    out: List[Frame] = []
    k = 0
    for f in native:
        if k < len(todo) and is_eval_frame(f):
            out.extend(resolve(code, word) for code, word in todo[k])
            k += 1
        else:
            out.append(f)
    for group in todo[k:]:
        out.extend(resolve(code, word) for code, word in group)
    return out
