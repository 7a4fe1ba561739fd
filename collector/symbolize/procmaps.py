"""Executable mappings of a process, from /proc/PID/maps."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class MappingInfo:
    start: int
    end: int
    file_offset: int
    path: str         # as the process sees it (its mount namespace)
    inode: int
    dev: str
    build_id: Optional[str] = None

    @property
    def binary_key(self) -> tuple:
        """What identifies the file across processes: build id, else (dev, inode)."""
        return ("build_id", self.build_id) if self.build_id else ("inode", self.dev, self.inode, self.path)


def read_maps(pid: int) -> List[MappingInfo]:
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or "x" not in parts[1]:
                    continue
                path = parts[5].strip()
                if not path.startswith("/"):
                    continue  # anonymous, [vdso], JIT: named from perf-PID.map if any
                lo, hi = parts[0].split("-")
                out.append(MappingInfo(int(lo, 16), int(hi, 16), int(parts[2], 16), path, int(parts[4]), parts[3]))
    except OSError:
        return []
    return out


class ProcessMaps:
    def __init__(self, mappings: List[MappingInfo]):
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]

    def find(self, addr: int) -> Optional[MappingInfo]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.mappings[i].end:
            return self.mappings[i]
        return None
