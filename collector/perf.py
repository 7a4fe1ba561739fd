"""perf_event_open(2) for the events probes sample on (no libc wrapper exists)."""
from __future__ import annotations

import ctypes
import os
import platform

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
_ATTR_FREQ_BIT = 1 << 10  # perf_event_attr.freq: sample_freq instead of sample_period


class PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period_or_freq", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC) -> int:
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(38, f"perf_event_open: unsupported architecture {platform.machine()}")
    attr.size = ctypes.sizeof(PerfEventAttr)
    fd = _libc.syscall(nr, ctypes.byref(attr), pid, cpu, group_fd, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open(cpu={cpu}): {os.strerror(err)}")
    return fd


def open_cpu_clock(cpu: int, freq: int, pid: int = -1) -> int:
    """A software cpu-clock sampling event at `freq` Hz on one CPU (works in VMs)."""
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_CPU_CLOCK,
                         sample_period_or_freq=freq, flags=_ATTR_FREQ_BIT)
    return perf_event_open(attr, pid, cpu)
