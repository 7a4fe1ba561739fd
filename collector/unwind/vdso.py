"""The vdso image: every process of one kernel maps the same one, so this
process's own copy (from /proc/self/maps and /proc/self/mem) stands for all.
Its link-time addresses start at 0: a process's bias is where it maps it."""
from __future__ import annotations

from typing import Optional, Tuple

MAX_VDSO = 1 << 20


def vdso_range(pid: str = "self") -> Optional[Tuple[int, int]]:
    """(start, end) of the [vdso] mapping of a process, None without one."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if line.rstrip().endswith("[vdso]"):
                    lo, hi = line.split(None, 1)[0].split("-")
                    return int(lo, 16), int(hi, 16)
    except (OSError, ValueError):
        return None
    return None


def vdso_image() -> bytes:
    """The vdso's ELF image, b"" when the kernel maps none (vdso=0)."""
    rng = vdso_range()
    if rng is None or not 0 < rng[1] - rng[0] <= MAX_VDSO:
        return b""
    try:
        with open("/proc/self/mem", "rb", buffering=0) as f:
            f.seek(rng[0])
            return f.read(rng[1] - rng[0])
    except (OSError, ValueError, OverflowError):
        return b""
