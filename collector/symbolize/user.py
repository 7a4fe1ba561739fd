"""Native user-space addresses -> frames.

File-backed code is symbolized per binary: the first time a binary (build id,
else device+inode) is seen in a live process, its function symbols are read
once (collector.symbolize.debuginfo: .symtab, separate debug files,
MiniDebugInfo, .dynsym) through /proc/PID/map_files, so container and deleted
binaries resolve too. A hundred forked workers of one server then cost one
table, and frames of a process that exited within the interval still resolve:
its mappings are kept until forget() is called after its last samples.

Anonymous executable memory (JITs) is named from the process's perf-PID.map.
Frames that stay unknown keep their mapping (file, build id, offset) so a
backend can symbolize them later. No bcc/LLVM is loaded for any of this.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Optional

from ..records import Frame
from .debuginfo import load_table
from .demangle import demangle
from .elf import build_id, load_segments
from .elf_symbols import SymbolTable
from .perfmap import PerfMap
from .procmaps import MappingInfo, ProcessMaps, read_maps

log = logging.getLogger("otelbpf.symbolize")


class BinarySymbols:
    """Function symbols of one ELF file, by file offset."""

    def __init__(self, path: str, known_as: Optional[str] = None, build_id: Optional[str] = None, root: str = ""):
        self.segments = load_segments(path)
        self.table: Optional[SymbolTable] = load_table(path, known_as or path, build_id, root)

    def __len__(self) -> int:
        return len(self.table) if self.table is not None else 0

    def vaddr(self, file_offset: int) -> Optional[int]:
        for off, size, va in self.segments:
            if off <= file_offset < off + size:
                return file_offset - off + va
        return None

    def resolve(self, file_offset: int) -> Optional[str]:
        vaddr = self.vaddr(file_offset)
        if vaddr is None or self.table is None:
            return None
        name = self.table.lookup(vaddr)
        return demangle(name.decode(errors="replace")) if name else None


class UserSymbolizer:
    def __init__(self, max_binaries: int = 1024):
        self._binaries: "collections.OrderedDict[tuple, BinarySymbols]" = collections.OrderedDict()
        self._max_binaries = max_binaries
        self._maps: dict = {}        # pid -> ProcessMaps, refreshed while the process lives
        self._perf_maps: dict = {}   # pid -> PerfMap, only for processes that wrote one
        self._build_ids: dict = {}   # (dev, inode, path) -> build id
        # (pid, addr, return_address) -> Frame until the next refresh: samples
        # share most frames (a busy collection: 37k frames, 1.7k distinct)
        self._frames: dict = {}
        self.binaries_loaded = 0
        # refresh() also runs in the profiler's unwind thread (a process is
        # read when first sampled, so one that exits within the interval
        # still resolves); every entry point holds this lock
        self._lock = threading.RLock()

    def refresh(self, pids) -> None:
        """Re-read the mappings of these live processes and load the symbols
        of binaries not seen before (while their files are reachable)."""
        with self._lock:
            self._frames.clear()
            for pid in pids:
                self._refresh_one(pid)

    def _refresh_one(self, pid: int) -> None:
        maps = []
        for m in read_maps(pid):
            via = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
            key = (m.dev, m.inode, m.path)
            if key not in self._build_ids:
                if len(self._build_ids) > 16 * self._max_binaries:
                    self._build_ids.clear()   # bounded: re-read a note rather than grow
                self._build_ids[key] = build_id(via)
            info = MappingInfo(m.start, m.end, m.file_offset, m.path, m.inode, m.dev, self._build_ids[key])
            if info.binary_key not in self._binaries:
                self._binaries[info.binary_key] = BinarySymbols(via, m.path, info.build_id, f"/proc/{pid}/root")
                self.binaries_loaded += 1
                if len(self._binaries) > self._max_binaries:
                    self._binaries.popitem(last=False)
            maps.append(info)
        if maps:
            self._maps[pid] = ProcessMaps(maps)
            # addresses outside every file mapping are looked up only where
            # a JIT wrote a perf map: elsewhere they are garbage from a
            # frame-pointer walk of code built without frame pointers
            pmap = self._perf_maps.get(pid) or PerfMap(pid)
            if pmap.exists():
                pmap.refresh()
                self._perf_maps[pid] = pmap

    def forget(self, pid: int) -> None:
        """A process exited (and its last samples were resolved): drop its maps."""
        with self._lock:
            self._maps.pop(pid, None)
            self._perf_maps.pop(pid, None)
            self._frames.clear()

    def known_pids(self):
        with self._lock:
            return list(self._maps)

    def resolve(self, pid: int, addr: int, return_address: bool = False) -> Frame:
        """return_address: addr is where a call returns to, so the call itself
        (addr - 1) names the function (a call that ends a function returns
        into the next one)."""
        key = (pid, addr, return_address)
        with self._lock:
            frame = self._frames.get(key)
            if frame is None:
                frame = self._frames[key] = self._resolve(pid, addr, addr - 1 if return_address else addr)
            return frame

    def _resolve(self, pid: int, addr: int, at: int) -> Frame:
        pm = self._maps.get(pid)
        mapping = pm.find(at) if pm else None
        if mapping is not None:
            table = self._binaries.get(mapping.binary_key)
            if table is not None:
                self._binaries.move_to_end(mapping.binary_key)
                name = table.resolve(at - mapping.start + mapping.file_offset)
            else:
                name = None
            return Frame(name, addr, mapping)
        pmap = self._perf_maps.get(pid)
        return Frame(pmap.lookup(at) if pmap is not None else None, addr, None)
