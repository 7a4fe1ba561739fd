// SPDX-License-Identifier: GPL-2.0
/* Whole-host CPU profiler: a perf_event program on every online CPU records
 * (pid, thread name, user stack, kernel stack) -> sample count in the kernel.
 *
 * Two buffers (counts + stacks): samples go to buffer `active`; user space
 * flips it, then drains and clears the other one, so a stack id is never
 * cleared while a count still refers to it.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "otb_stats.h"

#define PROF_STACK_DEPTH 127	/* the kernel's PERF_MAX_STACK_DEPTH default */

enum prof_stat {
	PROF_STAT_SAMPLES = 0,		/* every sample seen, idle included */
	PROF_STAT_IDLE,			/* samples of the idle task (pid 0) */
	PROF_STAT_USER_STACK_LOST,	/* stack map full or hash collision */
	PROF_STAT_KERNEL_STACK_LOST,
	PROF_STAT_COUNTS_FULL,		/* count map full: sample dropped */
	PROF_STAT_MAX,
};

struct prof_key {
	__u32 pid;
	__s32 user_stack;	/* stack id, or negative: none (kernel thread) / lost */
	__s32 kernel_stack;	/* stack id, or negative: none (sample in user mode) / lost */
	__u32 pad;
	char comm[16];		/* thread name */
};

const volatile bool drop_idle = true;

/* Which buffer the programs write; flipped by user space each interval. */
__u32 active = 0;

#define PROF_BUFFER(n)								\
	struct {								\
		__uint(type, BPF_MAP_TYPE_STACK_TRACE);				\
		__uint(max_entries, 16384);					\
		__uint(key_size, sizeof(__u32));				\
		__uint(value_size, PROF_STACK_DEPTH * sizeof(__u64));		\
	} prof_stacks##n SEC(".maps");						\
	struct {								\
		__uint(type, BPF_MAP_TYPE_HASH);				\
		__uint(max_entries, 16384);					\
		__type(key, struct prof_key);					\
		__type(value, __u64);						\
	} prof_counts##n SEC(".maps");

PROF_BUFFER(0)
PROF_BUFFER(1)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PROF_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} prof_stats SEC(".maps");

/* -EFAULT means there is no such stack (user stack of a kernel thread, kernel
 * stack of a sample taken in user mode); anything else is a lost stack. */
static __always_inline __s32 stack_id(void *ctx, void *stacks, __u64 flags, __u32 lost_stat)
{
	long id = bpf_get_stackid(ctx, stacks, flags);

	if (id < 0 && id != -14 /* EFAULT */)
		otb_count(&prof_stats, lost_stat);
	return (__s32)id;
}

static __always_inline void record(void *ctx, void *stacks, void *counts, __u32 pid)
{
	struct prof_key key = {};
	__u64 one = 1, *v;

	key.pid = pid;
	key.user_stack = stack_id(ctx, stacks, BPF_F_USER_STACK, PROF_STAT_USER_STACK_LOST);
	key.kernel_stack = stack_id(ctx, stacks, 0, PROF_STAT_KERNEL_STACK_LOST);
	bpf_get_current_comm(&key.comm, sizeof(key.comm));

	v = bpf_map_lookup_elem(counts, &key);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return;
	}
	if (bpf_map_update_elem(counts, &key, &one, BPF_NOEXIST) == 0)
		return;
	v = bpf_map_lookup_elem(counts, &key);	/* another CPU inserted it first */
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		otb_count(&prof_stats, PROF_STAT_COUNTS_FULL);
}

SEC("perf_event")
int prof_sample(struct bpf_perf_event_data *ctx)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;

	otb_count(&prof_stats, PROF_STAT_SAMPLES);
	if (pid == 0) {
		otb_count(&prof_stats, PROF_STAT_IDLE);
		if (drop_idle)
			return 0;
	}
	/* Two call sites, one per buffer: the verifier wants a fixed map per call. */
	if (active)
		record(ctx, &prof_stacks1, &prof_counts1, pid);
	else
		record(ctx, &prof_stacks0, &prof_counts0, pid);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
