"""Hand back to the kernel the pages glibc keeps for memory already freed.

Loading a BPF object makes libbpf read and index the kernel's BTF (5.5 MB
here, ~11 MiB in memory) and free it when the load ends. Other threads
allocate meanwhile, above it, so glibc cannot shrink its heap and keeps
the freed pages resident: measured with the default probes, the agent held
~15 MiB of them once all had started (RSS 102 -> 87 MiB after
malloc_trim(0), which took ~1 ms). Called after probes start only: a trim
after every collection measured no lower steady RSS.
"""
from __future__ import annotations

import ctypes


def release_freed() -> None:
    try:
        trim = ctypes.CDLL(None).malloc_trim    # glibc; musl has none and needs none
    except (AttributeError, OSError):
        return
    trim(0)
