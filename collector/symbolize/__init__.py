"""Addresses -> frames: kernel (kallsyms), native user code (our own ELF
symbol tables, debug files, perf-PID.map, ELF build ids, /proc/PID/maps)."""
