// SPDX-License-Identifier: GPL-2.0
/* Programs that exist only to learn whether the kernel accepts their type:
 * `otelbpf check` loads them one at a time (autoload off for the others). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("fentry/vfs_read")
int BPF_PROG(probe_fentry)
{
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
