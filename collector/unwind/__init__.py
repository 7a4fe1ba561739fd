"""Unwind tables for the profiler's kernel stack walker: compact rows built
from a binary's DWARF call-frame information (.eh_frame, .debug_frame) in a
child process, cached on disk by build id, plus a pure-Python reference of
the walk. The layout the kernel reads is bpf/unwind.h."""
