"""Stack unwinding support shared with the profiler's BPF walker (bpf/unwind.h)."""
