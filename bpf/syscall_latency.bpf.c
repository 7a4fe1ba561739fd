// SPDX-License-Identifier: GPL-2.0
/* Syscall latency: log2 histograms per (syscall, process or cgroup), built in
 * the kernel from the raw_syscalls enter/exit raw tracepoints. Nothing is sent
 * per event: user space reads the cumulative histograms once per interval.
 *
 * Hot-path budget: the enter side stores (tid, nr, timestamp) in a slot of an
 * ARRAY map indexed by tid (no hash insert/delete per syscall); the exit side
 * does one hash lookup and a few atomic adds.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "otb_stats.h"
#include <bpf/bpf_tracing.h>
#include "log2_hist.h"

/* Syscall numbers above this are ignored (x86_64 and aarch64 stay below). */
#define MAX_SYSCALLS 1024

enum sc_stat {
	SC_STAT_OVERFLOW = 0,	/* recorded in the overflow histogram: key map full */
	SC_STAT_SLOT_COLLISION,	/* enter overwrote another in-flight thread's slot */
	SC_STAT_NO_ENTER,	/* exit without a matching enter (in flight at attach, or collided) */
	SC_STAT_MAX,
};

struct sc_key {
	__u64 owner;	/* tgid, or cgroup id when key_by_cgroup */
	__u32 nr;
	__u32 pad;
};

struct sc_hist {
	char comm[16];	/* captured at first sight, so exited processes keep a name */
	__u64 buckets[OTB_LOG2_BUCKETS];
	__u64 sum_ns;
	__u64 errors;
};

struct sc_slot {
	__u64 start_ns;
	__u32 tid;
	__u32 nr;
};

/* Settings, written by user space before load. */
const volatile __u32 self_tgid = 0;		/* the agent itself, excluded when non-zero */
const volatile __u32 slot_mask = 0;		/* in-flight slot table size - 1 (power of two) */
const volatile bool key_by_cgroup = false;
const volatile bool filter_syscalls = false;	/* when set, only syscall_enabled[nr] are traced */
const volatile __u8 syscall_enabled[MAX_SYSCALLS] = {};
const volatile __s32 nr_exit = -1;		/* never return: not timed */
const volatile __s32 nr_exit_group = -1;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);		/* resized to slot_mask + 1 by user space */
	__type(key, __u32);
	__type(value, struct sc_slot);
} sc_lat_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);	/* bounded: see sc_lat_ovf for what does not fit */
	__type(key, struct sc_key);
	__type(value, struct sc_hist);
} sc_lat_hist SEC(".maps");

/* Per-syscall histograms for events whose key did not fit in sc_lat_hist. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SYSCALLS);
	__type(key, __u32);
	__type(value, struct sc_hist);
} sc_lat_ovf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SC_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sc_lat_stats SEC(".maps");

static __always_inline void hist_add(struct sc_hist *h, __u64 delta_ns, long ret)
{
	__u32 b = otb_log2_bucket(delta_ns);

	__sync_fetch_and_add(&h->buckets[b], 1);
	__sync_fetch_and_add(&h->sum_ns, delta_ns);
	if (ret < 0)
		__sync_fetch_and_add(&h->errors, 1);
}

SEC("raw_tp/sys_enter")
int sc_lat_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	long nr = (long)ctx->args[1];
	struct sc_slot *slot;
	__u32 idx;

	if (self_tgid && (id >> 32) == self_tgid)
		return 0;
	if (nr < 0 || nr >= MAX_SYSCALLS)
		return 0;
	if (nr == nr_exit || nr == nr_exit_group)
		return 0;
	if (filter_syscalls && !syscall_enabled[nr])
		return 0;

	idx = tid & slot_mask;
	slot = bpf_map_lookup_elem(&sc_lat_slots, &idx);
	if (!slot)
		return 0;
	if (slot->start_ns && slot->tid != tid)
		otb_count(&sc_lat_stats, SC_STAT_SLOT_COLLISION);
	slot->tid = tid;
	slot->nr = nr;
	slot->start_ns = bpf_ktime_get_ns();
	return 0;
}

SEC("raw_tp/sys_exit")
int sc_lat_exit(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	long ret = (long)ctx->args[1];
	struct sc_key key = {};
	struct sc_slot *slot;
	struct sc_hist *h;
	__u64 delta;
	__u32 idx;

	if (self_tgid && (id >> 32) == self_tgid)
		return 0;

	idx = tid & slot_mask;
	slot = bpf_map_lookup_elem(&sc_lat_slots, &idx);
	if (!slot)
		return 0;
	if (!slot->start_ns || slot->tid != tid) {
		/* Filtered-out syscalls leave no slot either: only count real misses. */
		if (!filter_syscalls)
			otb_count(&sc_lat_stats, SC_STAT_NO_ENTER);
		return 0;
	}
	delta = now - slot->start_ns;
	key.nr = slot->nr;
	slot->start_ns = 0;

	key.owner = key_by_cgroup ? bpf_get_current_cgroup_id() : (id >> 32);
	h = bpf_map_lookup_elem(&sc_lat_hist, &key);
	if (!h) {
		struct sc_hist init = {};

		bpf_get_current_comm(&init.comm, sizeof(init.comm));
		/* NOEXIST: a racing CPU may have inserted it; either way look it up again. */
		bpf_map_update_elem(&sc_lat_hist, &key, &init, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&sc_lat_hist, &key);
		if (!h) {
			/* The map is full: keep the event, in the per-syscall overflow. */
			h = bpf_map_lookup_elem(&sc_lat_ovf, &key.nr);
			if (!h)
				return 0;
			otb_count(&sc_lat_stats, SC_STAT_OVERFLOW);
		}
	}
	hist_add(h, delta, ret);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
