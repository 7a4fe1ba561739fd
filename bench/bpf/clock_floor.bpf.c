// SPDX-License-Identifier: GPL-2.0
/* The clock floor: raw_syscalls enter/exit programs that only read
 * bpf_ktime_get_ns(), the two clock reads any enter-to-exit latency probe
 * needs. The result lands in a per-CPU slot so the compiler keeps the calls. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bench_clock_sink SEC(".maps");

static __always_inline int read_clock(void)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&bench_clock_sink, &zero);

	if (v)
		*v = bpf_ktime_get_ns();
	return 0;
}

SEC("raw_tp/sys_enter")
int bench_clock_enter(void *ctx)
{
	return read_clock();
}

SEC("raw_tp/sys_exit")
int bench_clock_exit(void *ctx)
{
	return read_clock();
}

char LICENSE[] SEC("license") = "GPL";
