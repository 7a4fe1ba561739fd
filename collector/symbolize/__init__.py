"""Addresses -> frames: kernel (kallsyms), native user code (bcc's symbol
cache, ELF build ids, /proc/PID/maps)."""
