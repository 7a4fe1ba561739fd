// SPDX-License-Identifier: GPL-2.0
/* Exercises the libbpf binding: .rodata settings, hash/array/per-CPU maps
 * and a ring buffer, driven by one raw tracepoint filtered to a test pid. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile __u32 target_tgid = 0;
const volatile __u64 magic = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);	/* syscall nr */
	__type(value, __u64);	/* count */
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} total SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

struct engine_event {
	__u64 magic;
	__u32 tgid;
	__u32 nr;
};

SEC("raw_tp/sys_enter")
int engine_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 nr = (__u32)ctx->args[1], zero = 0;
	__u64 one = 1, *v;
	struct engine_event *e;

	if (tgid != target_tgid)
		return 0;
	v = bpf_map_lookup_elem(&counts, &nr);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&counts, &nr, &one, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&total, &zero);
	if (v)
		*v += 1;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->magic = magic;
		e->tgid = tgid;
		e->nr = nr;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

/* hook -> hits, filtered to target_tgid where a task context exists */
enum { HIT_TRACEPOINT, HIT_UPROBE, HIT_PERF_EVENT, HIT_MAX };

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HIT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

static __always_inline void hit(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&hits, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("tp/syscalls/sys_enter_getppid")
int engine_tp(void *ctx)
{
	if ((bpf_get_current_pid_tgid() >> 32) == target_tgid)
		hit(HIT_TRACEPOINT);
	return 0;
}

SEC("uprobe")
int engine_uprobe(void *ctx)
{
	if ((bpf_get_current_pid_tgid() >> 32) == target_tgid)
		hit(HIT_UPROBE);
	return 0;
}

SEC("perf_event")
int engine_perf(void *ctx)
{
	hit(HIT_PERF_EVENT);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
