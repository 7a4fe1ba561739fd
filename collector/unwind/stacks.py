"""User stacks the kernel walked (struct ustack in bpf/unwind.h), by the
hash the counts refer to.

The kernel keeps each distinct stack once in `prof_ustacks` and counts
refer to it by hash. User space drains that map into this cache and deletes
only entries it has read, so a count can always be resolved: from the
cache, or from the map if the kernel added the stack since. Stacks not
referred to for a few collections leave the cache. The cache keeps each
stack as the bytes the kernel wrote (its used slots only) and decodes it
when asked: as tuples of Python ints a stack took ~5x the memory, and a
busy host keeps thousands of them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

MAX_NATIVE = 128                          # UNWIND_MAX_NATIVE
MAX_PY = 48                               # UNWIND_MAX_PY
MAX_SLOTS = MAX_NATIVE + 2 * MAX_PY       # UNWIND_MAX_SLOTS
_HEAD = struct.Struct("=HHI")             # n_native, n_py, flags
_HASH = struct.Struct("=Q")
KEEP_COLLECTIONS = 3

# ustack flags (UNW_F_*)
COMPLETE, TRUNCATED, FP_USED, READ_FAIL, PY_TRUNC, PY, NO_PROC = 1, 2, 4, 8, 16, 32, 64
PC_EXACT = 1 << 63       # UNW_PC_EXACT: a native slot that is not a return address


@dataclass(frozen=True)
class WalkedStack:
    native: tuple        # return addresses, innermost first (the first is the sampled pc)
    python: tuple        # (code address, instruction word) pairs, innermost first
    flags: int


def _used(raw: bytes) -> bytes:
    """struct ustack cut after its last used slot."""
    n_native, n_py, _flags = _HEAD.unpack_from(raw, 0)
    return raw[:_HEAD.size + 8 * (min(n_native, MAX_NATIVE) + 2 * min(n_py, MAX_PY))]


def decode(raw: bytes) -> WalkedStack:
    n_native, n_py, flags = _HEAD.unpack_from(raw, 0)
    n_native = min(n_native, MAX_NATIVE)
    n_py = min(n_py, MAX_PY)
    slots = struct.unpack_from(f"={n_native + 2 * n_py}Q", raw, _HEAD.size)
    py = tuple(zip(slots[n_native::2], slots[n_native + 1::2]))
    return WalkedStack(tuple(slots[:n_native]), py, flags)


class UserStacks:
    def __init__(self, stacks_map):
        self._map = stacks_map
        self._cache: dict = {}      # hash -> [used bytes of struct ustack, collections since last use]

    def drain(self) -> None:
        """Move what the kernel added into the cache; age the cache."""
        for entry in self._cache.values():
            entry[1] += 1
        read = []
        for k, v in self._map.items():
            h = _HASH.unpack(k)[0]
            self._cache[h] = [_used(v), 0]
            read.append(k)
        self._map.delete_many(read)

    def get(self, h: int):
        entry = self._cache.get(h)
        if entry is None:
            raw = self._map.lookup(_HASH.pack(h))
            if raw is None:
                return None
            entry = self._cache[h] = [_used(raw), 0]
        entry[1] = 0
        return decode(entry[0])

    def expire(self) -> None:
        for h in [h for h, e in self._cache.items() if e[1] >= KEEP_COLLECTIONS]:
            del self._cache[h]

    def __len__(self) -> int:
        return len(self._cache)
