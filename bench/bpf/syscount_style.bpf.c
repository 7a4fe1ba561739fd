// SPDX-License-Identifier: GPL-2.0
/* The kernel logic of bcc's `syscount -L`, rebuilt in libbpf style because
 * bcc cannot compile its own programs on a kernel without headers: regular
 * raw_syscalls tracepoints, a hash map of start times keyed by thread
 * (insert on enter, lookup + delete on exit), and a hash of (count, total ns)
 * per syscall. Used only as the comparison baseline in bench/. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

struct sc_count {
	__u64 count;
	__u64 total_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, __u64);
} sc_style_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, __u32);
	__type(value, struct sc_count);
} sc_style_data SEC(".maps");

SEC("tp/raw_syscalls/sys_enter")
int sc_style_enter(struct trace_event_raw_sys_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 t = bpf_ktime_get_ns();

	bpf_map_update_elem(&sc_style_start, &id, &t, BPF_ANY);
	return 0;
}

SEC("tp/raw_syscalls/sys_exit")
int sc_style_exit(struct trace_event_raw_sys_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 key = (__u32)ctx->id;
	struct sc_count zero = {}, *val;
	__u64 *start;

	start = bpf_map_lookup_elem(&sc_style_start, &id);
	if (!start)
		return 0;
	val = bpf_map_lookup_elem(&sc_style_data, &key);
	if (!val) {
		bpf_map_update_elem(&sc_style_data, &key, &zero, BPF_NOEXIST);
		val = bpf_map_lookup_elem(&sc_style_data, &key);
		if (!val)
			goto out;
	}
	__sync_fetch_and_add(&val->count, 1);
	__sync_fetch_and_add(&val->total_ns, bpf_ktime_get_ns() - *start);
out:
	bpf_map_delete_elem(&sc_style_start, &id);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
