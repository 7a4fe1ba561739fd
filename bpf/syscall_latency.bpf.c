// SPDX-License-Identifier: GPL-2.0
/* Syscall latency: log2 histograms per (syscall, process or cgroup), built in
 * the kernel from the raw_syscalls enter/exit raw tracepoints. Nothing is sent
 * per event: user space reads the cumulative histograms once per interval.
 *
 * Hot-path budget: the enter side stores (tid, nr, timestamp) in a slot of an
 * ARRAY map indexed by tid (no hash insert/delete per syscall). The exit side
 * finds its histogram in an ARRAY at a position hashed from (owner, nr): an
 * inlined array lookup and a key compare instead of a hash-map lookup (jhash,
 * bucket walk, memcmp: about half the probe's cost beyond its clock reads).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "otb_stats.h"
#include <bpf/bpf_tracing.h>
#include "log2_hist.h"

/* Syscall numbers above this are ignored (x86_64 and aarch64 stay below). */
#define MAX_SYSCALLS 1024

enum sc_stat {
	SC_STAT_OVERFLOW = 0,	/* recorded in the overflow histogram: no free entry for its key */
	SC_STAT_SLOT_COLLISION,	/* enter overwrote another in-flight thread's slot */
	SC_STAT_NO_ENTER,	/* exit without a matching enter (in flight at attach, or collided) */
	SC_STAT_MAX,
};

/* Entries of sc_lat_hist a key may occupy, from its home position on: with
 * 16, about 1% of new keys find no room when 3/4 of the entries are taken. */
#define SC_PROBES 16

struct sc_hist {
	__u64 owner;	/* tgid, or cgroup id when key_by_cgroup; 0: entry free */
	__u32 nr;
	__u32 pad;
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
const volatile __u32 hist_entries = 1;		/* max_entries of sc_lat_hist */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);		/* resized to slot_mask + 1 by user space */
	__type(key, __u32);
	__type(value, struct sc_slot);
} sc_lat_slots SEC(".maps");

/* The histograms, open addressing: a key lives at its home position or one
 * of the next SC_PROBES - 1. User space reads it through mmap and frees the
 * entries of exited owners. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 16384);	/* set to max_keys by user space; see sc_lat_ovf for what does not fit */
	__type(key, __u32);
	__type(value, struct sc_hist);
} sc_lat_hist SEC(".maps");

/* Which sc_lat_hist entries are taken: inserting an index with BPF_NOEXIST
 * is the atomic claim (5.10 has no compare-and-swap). User space deletes an
 * index after zeroing its entry. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);	/* = sc_lat_hist's */
	__type(key, __u32);
	__type(value, __u8);
} sc_lat_claims SEC(".maps");

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

static __always_inline __u32 home_index(__u64 owner, __u32 nr)
{
	/* Fibonacci hashing, then a multiply-shift onto [0, hist_entries). */
	__u64 h = (owner ^ ((__u64)nr << 40)) * 0x9E3779B97F4A7C15ULL;

	return ((h >> 32) * hist_entries) >> 32;
}

/* The entry of (owner, nr) after a miss at its home position: a later probe,
 * or a free entry claimed now. NULL when all SC_PROBES are others' (or the
 * claims map is full). A key may end up in two entries when two CPUs claim for
 * it at once, or after user space freed an entry before it: user space sums
 * entries by key, so that costs an entry, never a count. */
static __noinline struct sc_hist *find_slow(__u64 owner, __u32 nr, __u32 idx)
{
	__u8 one = 1;

	for (int i = 0; i < SC_PROBES; i++) {
		struct sc_hist *h = bpf_map_lookup_elem(&sc_lat_hist, &idx);

		if (!h)
			return NULL;
		if (h->owner == owner && h->nr == nr)
			return h;
		if (!h->owner && !bpf_map_update_elem(&sc_lat_claims, &idx, &one, BPF_NOEXIST)) {
			h->nr = nr;
			bpf_get_current_comm(&h->comm, sizeof(h->comm));
			h->owner = owner;	/* last: the entry is now found by its key */
			return h;
		}
		if (h->owner == owner && h->nr == nr)	/* claimed for us by another CPU */
			return h;
		idx = idx + 1 < hist_entries ? idx + 1 : 0;
	}
	return NULL;
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
	struct sc_slot *slot;
	struct sc_hist *h;
	__u64 delta;
	__u64 owner;
	__u32 idx, nr;

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
	nr = slot->nr;
	slot->start_ns = 0;

	owner = key_by_cgroup ? bpf_get_current_cgroup_id() : (id >> 32);
	idx = home_index(owner, nr);
	h = bpf_map_lookup_elem(&sc_lat_hist, &idx);
	if (!h || h->owner != owner || h->nr != nr) {
		h = find_slow(owner, nr, idx);
		if (!h) {
			/* No room: keep the event, in the per-syscall overflow. */
			h = bpf_map_lookup_elem(&sc_lat_ovf, &nr);
			if (!h)
				return 0;
			otb_count(&sc_lat_stats, SC_STAT_OVERFLOW);
		}
	}
	hist_add(h, delta, ret);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
