"""Native user-space addresses -> frames.

File-backed code is symbolized per binary: the first time a binary (build id,
else device+inode) is seen in a live process, its function symbols are read
once through bcc (python3-bpfcc's bcc_foreach_function_symbol: ELF
symtab/dynsym, and the debuglink/build-id debug file when the binary is
stripped), through /proc/PID/map_files so container binaries resolve too.
A hundred forked workers of one server then cost one table, and frames of a
process that exited within the interval still resolve.

Anonymous executable memory (JITs) goes to bcc's per-process symbolizer,
which reads perf-PID.map files (Node --perf-basic-prof, perf-map-agent).
Frames that stay unknown keep their mapping (file, build id, offset) so a
backend can symbolize them later. bcc compiles nothing here.
"""
from __future__ import annotations

import bisect
import collections
import logging
import os
from typing import Optional

from ..records import Frame
from .demangle import demangle
from .elf import build_id, load_segments
from .procmaps import MappingInfo, ProcessMaps, read_maps

log = logging.getLogger("otelbpf.symbolize")


def _load_bcc():
    try:
        import bcc  # python3-bpfcc, visible through the venv's system site-packages
        return bcc
    except Exception as e:  # ImportError, or libbcc failing to load
        log.warning("bcc is unavailable (%s): user frames keep addresses and mappings only", e)
        return None


class BinarySymbols:
    """Function symbols of one ELF file, by file offset."""

    def __init__(self, path: str, bcc):
        self.segments = load_segments(path)
        starts, names = [], []
        if bcc is not None:
            def cb(name, addr):
                if addr:
                    starts.append(addr)
                    names.append(name)
                return 0
            bcc.lib.bcc_foreach_function_symbol(path.encode(), bcc._SYM_CB_TYPE(cb))
        order = sorted(range(len(starts)), key=starts.__getitem__)
        self._starts = [starts[i] for i in order]
        self._names = [names[i] for i in order]

    def __len__(self) -> int:
        return len(self._starts)

    def resolve(self, file_offset: int) -> Optional[str]:
        vaddr = None
        for off, size, va in self.segments:
            if off <= file_offset < off + size:
                vaddr = file_offset - off + va
                break
        if vaddr is None:
            return None
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        name = self._names[i]
        return demangle(name.decode(errors="replace") if isinstance(name, bytes) else name)


class UserSymbolizer:
    def __init__(self, max_binaries: int = 1024):
        self._bcc = _load_bcc()
        self._binaries: "collections.OrderedDict[tuple, BinarySymbols]" = collections.OrderedDict()
        self._max_binaries = max_binaries
        self._maps: dict = {}        # pid -> ProcessMaps, refreshed while the process lives
        self._build_ids: dict = {}   # (dev, inode, path) -> build id
        self.binaries_loaded = 0

    @property
    def available(self) -> bool:
        return self._bcc is not None

    def refresh(self, pids) -> None:
        """Re-read the mappings of these live processes and load the symbols
        of binaries not seen before (while their files are reachable)."""
        for pid in pids:
            maps = []
            for m in read_maps(pid):
                via = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
                key = (m.dev, m.inode, m.path)
                if key not in self._build_ids:
                    self._build_ids[key] = build_id(via)
                info = MappingInfo(m.start, m.end, m.file_offset, m.path, m.inode, m.dev, self._build_ids[key])
                if info.binary_key not in self._binaries:
                    self._binaries[info.binary_key] = BinarySymbols(via, self._bcc)
                    self.binaries_loaded += 1
                    if len(self._binaries) > self._max_binaries:
                        self._binaries.popitem(last=False)
                maps.append(info)
            if maps:
                pm = self._maps[pid] = ProcessMaps(maps)
                # bcc is asked about addresses outside every file mapping only
                # where a JIT wrote a perf map: elsewhere they are garbage from
                # a frame-pointer walk of code built without frame pointers,
                # and each bcc lookup of one costs more than the sample
                pm.perf_map = os.path.exists(f"/proc/{pid}/root/tmp/perf-{pid}.map")

    def forget(self, pid: int) -> None:
        """A process exited (and its last samples were resolved): drop its maps."""
        self._maps.pop(pid, None)
        if self._bcc is not None:
            self._bcc.BPF._sym_caches.pop(pid, None)

    def known_pids(self):
        return list(self._maps)

    def resolve(self, pid: int, addr: int) -> Frame:
        pm = self._maps.get(pid)
        mapping = pm.find(addr) if pm else None
        if mapping is not None:
            table = self._binaries.get(mapping.binary_key)
            if table is not None:
                self._binaries.move_to_end(mapping.binary_key)
                name = table.resolve(addr - mapping.start + mapping.file_offset)
            else:
                name = None
            return Frame(name, addr, mapping)
        # anonymous/JIT code: bcc reads /tmp/perf-PID.map (live processes only)
        name = None
        if self._bcc is not None and pm is not None and pm.perf_map:
            raw = self._bcc.BPF.sym(addr, pid)
            if raw and raw != b"[unknown]":
                name = raw.decode(errors="replace")
        return Frame(name, addr, None)
