"""A process's executable mappings as the kernel walker sees them
(struct unwind_proc in bpf/unwind.h): where each mapping starts, the bias
that turns a pc into its binary's link-time address, and the range of rows
that cover it in the pool.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional

from ..symbolize.elf import build_id, load_segments
from .lookup import bias_of

MAX_MAPPINGS = 128                      # UNWIND_MAX_MAPPINGS
_MAPPING = struct.Struct("<QQIIII")     # struct unwind_mapping
_HEAD = struct.Struct("<II")            # n, gen
PROC_BYTES = _HEAD.size + MAX_MAPPINGS * _MAPPING.size
VDSO_KEY = ("vdso",)                    # one kernel, one vdso image for every process


@dataclass(frozen=True)
class ExecMapping:
    start: int
    end: int
    file_offset: int
    path: str           # as the process sees it; "[vdso]" for the vdso
    dev: str
    inode: int

    @property
    def is_vdso(self) -> bool:
        return self.path == "[vdso]"

    @property
    def is_anonymous(self) -> bool:
        """Executable memory without a file: JIT code (V8, the JVM), walked
        by frame pointers (JITs keep them) and named from perf-PID.map."""
        return not self.path.startswith("/") and not self.is_vdso

    def open_path(self, pid: int) -> str:
        """The file itself, also when it lives in another mount namespace or was deleted."""
        return f"/proc/{pid}/map_files/{self.start:x}-{self.end:x}"


def exec_mappings(pid: int) -> List[ExecMapping]:
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 5 or "x" not in parts[1]:
                    continue
                path = parts[5].strip() if len(parts) > 5 else ""
                if path.startswith("[") and path != "[vdso]" and not path.startswith("[anon"):
                    continue   # [vsyscall], [uprobes]: never a user stack frame worth a table
                lo, hi = parts[0].split("-")
                out.append(ExecMapping(int(lo, 16), int(hi, 16), int(parts[2], 16), path,
                                       parts[3], int(parts[4])))
    except (OSError, ValueError):
        return []
    return out


class BinaryIdentity:
    """Which binary a mapping holds (build id, else device+inode) and its
    load segments, read once per file."""

    def __init__(self):
        self._ids: dict = {}

    def key(self, pid: int, m: ExecMapping) -> Optional[tuple]:
        """None for anonymous code: it has no table."""
        if m.is_vdso:
            return VDSO_KEY
        if m.is_anonymous:
            return None
        file_key = (m.dev, m.inode, m.path)
        if file_key not in self._ids:
            if len(self._ids) > 65536:
                self._ids.clear()   # bounded: re-read a note rather than grow
            bid = build_id(m.open_path(pid))
            self._ids[file_key] = (("build_id", bid) if bid else ("inode",) + file_key)
        return self._ids[file_key]


def mapping_bias(pid: int, m: ExecMapping) -> Optional[int]:
    """pc - bias = the binary's link-time address, from the PT_LOAD segment
    that holds the mapping's file offset."""
    if m.is_vdso or m.is_anonymous:
        return m.start   # the vdso is linked at 0; anonymous code has no link-time addresses
    return bias_of(m.start, m.file_offset, load_segments(m.open_path(pid)))


def pack_proc(entries: list, gen: int) -> bytes:
    """entries: (start, bias, size, table_start, table_len, flags), any order;
    the kernel binary-searches them by start."""
    entries = sorted(entries)[:MAX_MAPPINGS]
    out = bytearray(PROC_BYTES)
    _HEAD.pack_into(out, 0, len(entries), gen)
    for i, e in enumerate(entries):
        _MAPPING.pack_into(out, _HEAD.size + i * _MAPPING.size, *e)
    return bytes(out)


def unpack_proc(raw: bytes) -> list:
    n, _gen = _HEAD.unpack_from(raw, 0)
    return [_MAPPING.unpack_from(raw, _HEAD.size + i * _MAPPING.size) for i in range(min(n, MAX_MAPPINGS))]
