// SPDX-License-Identifier: GPL-2.0
/* Uprobe and uretprobe hits per process: how many a TLS request costs. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);	/* tgid */
	__type(value, __u64[2]);	/* entry hits, return hits */
} hits SEC(".maps");

static __always_inline int bump(int which)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 zero[2] = {}, *v = bpf_map_lookup_elem(&hits, &tgid);

	if (!v) {
		bpf_map_update_elem(&hits, &tgid, zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&hits, &tgid);
		if (!v)
			return 0;
	}
	__sync_fetch_and_add(&v[which], 1);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(count_entry) { return bump(0); }

SEC("uretprobe")
int BPF_KRETPROBE(count_return) { return bump(1); }

char LICENSE[] SEC("license") = "GPL";
