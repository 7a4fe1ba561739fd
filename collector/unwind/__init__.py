"""Per-binary unwind tables for the profiler's in-kernel stack walk (bpf/unwind.h)."""
