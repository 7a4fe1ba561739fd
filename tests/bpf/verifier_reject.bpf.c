// SPDX-License-Identifier: GPL-2.0
/* Deliberately rejected by the verifier (a hash map value used without a NULL
 * check), so tests can see that the error names the program and carries the
 * verifier's log. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} rejected_map SEC(".maps");

SEC("raw_tp/sys_enter")
int rejected_prog(void *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&rejected_map, &zero);

	*v += 1;	/* no NULL check: the verifier must refuse this */
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
