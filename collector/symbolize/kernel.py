"""Kernel addresses -> function names, from /proc/kallsyms.

The table is packed (addresses in an array, names in one bytes blob): the
~120k text symbols of a distro kernel took 18 MiB as lists of int and str
objects, 5 MiB packed, for the agent's whole lifetime."""
from __future__ import annotations

import bisect
from array import array
from typing import Optional, Tuple

_TEXT_TYPES = frozenset(b"tTwW")


class KernelSymbols:
    def __init__(self, path: str = "/proc/kallsyms"):
        addrs, offs, blob = array("Q"), array("I"), bytearray()
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or len(parts[1]) != 1 or parts[1][0] not in _TEXT_TYPES:
                    continue
                addr = int(parts[0], 16)
                if addr:
                    addrs.append(addr)
                    offs.append(len(blob))
                    blob += parts[2]
        offs.append(len(blob))
        tail = _unsorted_from(addrs)
        if tail < len(addrs):
            # re-sort only from where the first out-of-order address belongs (modules and
            # BPF programs come last, in load order), stable: ties keep the file's order
            order = sorted(range(tail, len(addrs)), key=addrs.__getitem__)
            moved = [(addrs[i], blob[offs[i]:offs[i + 1]]) for i in order]
            del blob[offs[tail]:]
            del addrs[tail:]
            del offs[tail:]
            for addr, name in moved:
                addrs.append(addr)
                offs.append(len(blob))
                blob += name
            offs.append(len(blob))
        self._addrs = addrs
        self._offs = offs
        self._names = bytes(blob)
        # kptr_restrict hides addresses (all zero) from unprivileged readers
        self.available = bool(self._addrs)

    def __len__(self) -> int:
        return len(self._addrs)

    def resolve(self, addr: int) -> Optional[Tuple[str, int]]:
        """(function, offset) of the symbol containing addr, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        name = self._names[self._offs[i]:self._offs[i + 1]].decode(errors="replace")
        return name, addr - self._addrs[i]


def _unsorted_from(addrs) -> int:
    """The index from which addrs needs sorting: len(addrs) when sorted, else
    where the lowest address after the first inversion goes in the sorted prefix."""
    first = next((i for i in range(1, len(addrs)) if addrs[i] < addrs[i - 1]), None)
    if first is None:
        return len(addrs)
    return bisect.bisect_right(addrs, min(addrs[first:]), 0, first)
