"""Kernel addresses -> function names, from /proc/kallsyms."""
from __future__ import annotations

import bisect
from typing import Optional, Tuple

_TEXT_TYPES = set("tTwW")


class KernelSymbols:
    def __init__(self, path: str = "/proc/kallsyms"):
        addrs, names = [], []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in _TEXT_TYPES:
                    continue
                addr = int(parts[0], 16)
                if addr:
                    addrs.append(addr)
                    names.append(parts[2])
        order = sorted(range(len(addrs)), key=addrs.__getitem__)
        self._addrs = [addrs[i] for i in order]
        self._names = [names[i] for i in order]
        # kptr_restrict hides addresses (all zero) from unprivileged readers
        self.available = bool(self._addrs)

    def resolve(self, addr: int) -> Optional[Tuple[str, int]]:
        """(function, offset) of the symbol containing addr, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        return self._names[i], addr - self._addrs[i]
