// SPDX-License-Identifier: GPL-2.0
/* The floor: empty raw_syscalls enter/exit programs. Whatever a syscall
 * probe adds above this is its own cost. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("raw_tp/sys_enter")
int bench_empty_enter(void *ctx)
{
	return 0;
}

SEC("raw_tp/sys_exit")
int bench_empty_exit(void *ctx)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
