"""Where CPython keeps what the frame walk reads, per minor version (x86-64).

3.8 to 3.12 come from a table written from CPython's own headers of that
version (Include/cpython/pystate.h, Include/internal/pycore_runtime.h,
pycore_interp.h, pycore_frame.h, Include/cpython/code.h, frameobject.h,
unicodeobject.h). 3.13 needs no table: its _PyRuntime starts with
_Py_DebugOffsets (pycore_runtime.h), read from the interpreter binary.

Checked against a real build here: 3.9 (Debian 11's python3.9), 3.11
(Debian 12's) and 3.13 (Debian 13's), by running them under the walker
(tests/test_python_frames.py) and against the DWARF of their -dbg packages.
3.8, 3.10 and 3.12 are from the headers only, untested here; detection
still checks a live process against them (tstate->interp must point back
at the interpreter) before the walker uses them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Optional

# enum py_frames in bpf/unwind_python.h
FRAMES_LASTI_BYTES, FRAMES_LASTI_UNITS, FRAMES_IS_ENTRY, FRAMES_OWNER = 1, 2, 3, 4

# line table formats (collector/unwind/python_lines.py)
LNOTAB, LINETABLE_310, LOCATIONS = "lnotab", "linetable310", "locations"


@dataclass(frozen=True)
class Layout:
    version: tuple                 # (3, 11)
    frames: int                    # FRAMES_*
    runtime_interp_head: int       # _PyRuntimeState.interpreters.head
    interp_threads_head: int       # PyInterpreterState.threads.head / tstate_head
    tstate_next: int
    tstate_interp: int
    tstate_thread_id: int          # pthread_self()
    tstate_native_thread_id: Optional[int]   # gettid(), 3.11+
    tstate_frame: int              # frame / cframe / current_frame
    cframe_current: Optional[int]  # _PyCFrame.current_frame (3.11, 3.12)
    frame_previous: int
    frame_code: int
    frame_instr: int               # f_lasti / prev_instr / instr_ptr
    frame_entry: Optional[int]     # is_entry (3.11)
    frame_owner: Optional[int]     # owner (3.12+)
    code_adaptive: Optional[int]   # co_code_adaptive (3.11+)
    code_filename: int
    code_name: int
    code_qualname: Optional[int]   # 3.11+
    code_linetable: int            # co_lnotab (3.8, 3.9) / co_linetable
    code_firstlineno: int
    lines: str                     # LNOTAB / LINETABLE_310 / LOCATIONS
    unicode_ascii_size: int        # sizeof(PyASCIIObject)
    unicode_compact_size: int      # sizeof(PyCompactUnicodeObject)
    bytes_sval: int = 32           # PyBytesObject.ob_sval
    tested: bool = False           # run under the walker on this project's machines


_V38 = Layout(
    version=(3, 8), frames=FRAMES_LASTI_BYTES,
    runtime_interp_head=32, interp_threads_head=8,
    tstate_next=8, tstate_interp=16, tstate_thread_id=176, tstate_native_thread_id=None,
    tstate_frame=24, cframe_current=None,
    frame_previous=24, frame_code=32, frame_instr=104, frame_entry=None, frame_owner=None,
    code_adaptive=None, code_filename=104, code_name=112, code_qualname=None,
    code_linetable=120, code_firstlineno=40, lines=LNOTAB,
    unicode_ascii_size=48, unicode_compact_size=72)

# 3.10: f_lasti counts code units; co_linetable replaces co_lnotab; the
# frame object lost f_stacktop (f_lasti 104 -> 96).
_V310 = replace(_V38, version=(3, 10), frames=FRAMES_LASTI_UNITS, frame_instr=96, lines=LINETABLE_310)

_V311 = Layout(
    version=(3, 11), frames=FRAMES_IS_ENTRY,
    runtime_interp_head=40, interp_threads_head=16,
    tstate_next=8, tstate_interp=16, tstate_thread_id=152, tstate_native_thread_id=160,
    tstate_frame=56, cframe_current=8,
    frame_previous=48, frame_code=32, frame_instr=56, frame_entry=68, frame_owner=69,
    code_adaptive=184, code_filename=112, code_name=120, code_qualname=128,
    code_linetable=136, code_firstlineno=72, lines=LOCATIONS,
    unicode_ascii_size=48, unicode_compact_size=72, tested=True)

# 3.12: shim frames instead of is_entry, _PyCFrame lost use_tracing, and
# PyASCIIObject lost wstr.
_V312 = Layout(
    version=(3, 12), frames=FRAMES_OWNER,
    runtime_interp_head=48, interp_threads_head=72,
    tstate_next=8, tstate_interp=16, tstate_thread_id=136, tstate_native_thread_id=144,
    tstate_frame=56, cframe_current=0,
    frame_previous=8, frame_code=0, frame_instr=56, frame_entry=None, frame_owner=70,
    code_adaptive=192, code_filename=112, code_name=120, code_qualname=128,
    code_linetable=136, code_firstlineno=68, lines=LOCATIONS,
    unicode_ascii_size=40, unicode_compact_size=56)

TABLES = {
    (3, 8): _V38,
    (3, 9): replace(_V38, version=(3, 9), tested=True),
    (3, 10): _V310,
    (3, 11): _V311,
    (3, 12): _V312,
}

DEBUG_COOKIE = b"xdebugpy"
# _Py_DebugOffsets of 3.13 as u64 words after the 8-byte cookie: the index
# of each field we read (pycore_runtime.h, 3.13).
_DEBUG_313 = {
    "version": 0, "free_threaded": 1,
    "runtime_interp_head": 4,
    "interp_threads_head": 8,
    "tstate_next": 20, "tstate_interp": 21, "tstate_frame": 22,
    "tstate_thread_id": 23, "tstate_native_thread_id": 24,
    "frame_previous": 28, "frame_code": 29, "frame_instr": 30, "frame_owner": 32,
    "code_filename": 34, "code_name": 35, "code_qualname": 36, "code_linetable": 37,
    "code_firstlineno": 38, "code_adaptive": 42,
    "bytes_sval": 65, "unicode_ascii_size": 69,
}
DEBUG_313_SIZE = 8 + 8 * 72   # sizeof(_Py_DebugOffsets) in 3.13


def version_of_hex(hexversion: int) -> tuple:
    """PY_VERSION_HEX -> (major, minor)."""
    return (hexversion >> 24) & 0xFF, (hexversion >> 16) & 0xFF


def from_debug_offsets(raw: bytes) -> tuple:
    """(Layout, None) from the bytes of _Py_DebugOffsets at the start of
    _PyRuntime, or (None, reason)."""
    if len(raw) < DEBUG_313_SIZE or raw[:8] != DEBUG_COOKIE:
        return None, "no _Py_DebugOffsets cookie at _PyRuntime"
    words = struct.unpack_from("<72Q", raw, 8)
    version = version_of_hex(words[0])
    if version != (3, 13):
        return None, f"unsupported CPython {version[0]}.{version[1]} (_Py_DebugOffsets of another layout)"
    if words[_DEBUG_313["free_threaded"]]:
        return None, "unsupported: free-threaded CPython 3.13t"
    v = {k: words[i] for k, i in _DEBUG_313.items()}
    if any(x > 0xFFFE for k, x in v.items() if k not in ("version", "free_threaded")):
        return None, "implausible _Py_DebugOffsets (an offset past 64 KiB)"
    return Layout(
        version=version, frames=FRAMES_OWNER,
        runtime_interp_head=v["runtime_interp_head"], interp_threads_head=v["interp_threads_head"],
        tstate_next=v["tstate_next"], tstate_interp=v["tstate_interp"],
        tstate_thread_id=v["tstate_thread_id"], tstate_native_thread_id=v["tstate_native_thread_id"],
        tstate_frame=v["tstate_frame"], cframe_current=None,
        frame_previous=v["frame_previous"], frame_code=v["frame_code"], frame_instr=v["frame_instr"],
        frame_entry=None, frame_owner=v["frame_owner"],
        code_adaptive=v["code_adaptive"], code_filename=v["code_filename"], code_name=v["code_name"],
        code_qualname=v["code_qualname"], code_linetable=v["code_linetable"],
        code_firstlineno=v["code_firstlineno"], lines=LOCATIONS,
        unicode_ascii_size=v["unicode_ascii_size"], unicode_compact_size=v["unicode_ascii_size"] + 16,
        bytes_sval=v["bytes_sval"], tested=True), None
