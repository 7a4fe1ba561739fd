// SPDX-License-Identifier: GPL-2.0
/* Whole-host CPU profiler: a perf_event program on every online CPU records
 * (pid, thread name, user stack, kernel stack) -> sample count in the kernel.
 *
 * The user stack is walked here, not by the kernel's frame-pointer walk:
 * distro binaries have no frame pointers. User space turns each binary's
 * .eh_frame into rows (bpf/unwind.h) and gives each process a table of its
 * mappings; the walk applies one row per frame (CFA rule, return address at
 * CFA-8, saved rbp) and falls back to frame pointers where no row covers a
 * pc. A sample of a process without a table yet is walked by frame pointers
 * and still counted, and asks user space for the table.
 *
 * The walk runs UNWIND_FRAMES_PER_CALL frames per program and tail-calls
 * itself for the next ones, which keeps each program small enough for the
 * verifier of every kernel (no bpf_loop before 5.17). The state between
 * calls is a per-CPU scratch.
 *
 * Counts and kernel stacks are double-buffered: samples go to buffer
 * `active`; user space flips it, then drains and clears the other one, so a
 * stack id is never cleared while a count still refers to it. User stacks
 * are keyed by a hash of their frames in one map that user space drains
 * into its own cache (it deletes only what it has read).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "otb_stats.h"
#include "unwind.h"
#include "unwind_python.h"
#include "thread_request.h"

#define PROF_STACK_DEPTH 127	/* the kernel's PERF_MAX_STACK_DEPTH default */
#define UNWIND_FRAMES_PER_CALL 8
#define UNWIND_ROW_SEARCH 23	/* binary search steps: 8M rows */
#define UNWIND_MAP_SEARCH 8	/* binary search steps: UNWIND_MAX_MAPPINGS */
#define PF_KTHREAD 0x00200000
#define THREAD_SIZE_X86_64 16384	/* where task_pt_regs is before bpf_task_pt_regs (5.15) */

enum prof_stat {
	PROF_STAT_SAMPLES = 0,		/* every sample seen, idle included */
	PROF_STAT_IDLE,			/* samples of the idle task (pid 0) */
	PROF_STAT_USER_STACK_LOST,	/* user stack map full */
	PROF_STAT_KERNEL_STACK_LOST,
	PROF_STAT_COUNTS_FULL,		/* count map full: sample dropped */
	PROF_STAT_UNWIND_NO_TABLE,	/* process had no mapping table yet: frame pointers */
	PROF_STAT_UNWIND_TRUNCATED,	/* deeper than UNWIND_MAX_NATIVE */
	PROF_STAT_UNWIND_READ_FAIL,	/* a stack or register read failed mid-walk */
	PROF_STAT_UNWIND_FP_FRAMES,	/* frames found by frame pointers (no row covered the pc) */
	PROF_STAT_UNWIND_UNSUPPORTED,	/* frames whose row the walker cannot follow */
	PROF_STAT_UNWIND_BAD_FRAME,	/* a frame that did not move up the stack: walk stopped */
	PROF_STAT_TAIL_CALL_FAIL,	/* the walk's tail call failed: recorded as far as it got */
	PROF_STAT_IN_REQUEST,		/* samples of a thread serving an HTTP request */
	PROF_STAT_MAX,
};

enum prof_prog {
	PROF_PROG_UNWIND = 0,
	PROF_PROG_PYTHON,
	PROF_PROG_MAX,
};

/* The HTTP request a sample's thread was serving (thread_request.h). */
struct prof_request {
	__u64 route;		/* its path's hash */
	__u64 span_id;		/* 0: the request has no span */
	__u8 trace_id[16];
	__u8 method;
	__u8 in_request;	/* 0: the thread served no request (the rest is zero) */
	__u8 pad[6];
};

struct prof_key {
	__u32 pid;
	__s32 kernel_stack;	/* stack id, or negative: none (sample in user mode) / lost */
	__u64 user_stack;	/* hash of the walked user stack, 0: none (kernel thread) / lost */
	char comm[16];		/* thread name */
	struct prof_request req;
};

/* The walk's state between its tail calls. */
struct prof_walk {
	__u64 pc, sp, bp;
	__u32 pid, tid;
	__s32 kernel_stack;
	__u8 exact_pc;		/* pc is where the thread is (leaf, interrupted by a signal), not a return address */
	__u8 bp_valid;
	__u8 py;		/* the process runs an interpreter whose frames are read */
	__u8 pad;
	char comm[16];
	struct prof_request req;
	struct ustack st;
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
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct ustack);
} prof_ustacks SEC(".maps");

/* Unwind rows of every loaded binary, one pool; user space allocates ranges
 * and writes them through mmap. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1 << 20);
	__type(key, __u32);
	__type(value, struct unwind_row);
} unwind_rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);		/* pid */
	__type(value, struct unwind_proc);
} unwind_procs SEC(".maps");

/* What the walk lacked, with how many samples lacked it: a process without
 * a mapping table (WANT_PROCESS), a mapping without rows (WANT_MAPPING, by
 * its start), a pc outside every mapping (WANT_REFRESH: dlopen, exec). User
 * space reads and deletes them, and builds the most wanted tables first. */
#define WANT_PROCESS 1
#define WANT_MAPPING 2
#define WANT_REFRESH 3

struct want_key {
	__u32 pid;
	__u32 why;
	__u64 start;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct want_key);
	__type(value, __u32);
} unwind_wanted SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct prof_walk);
} prof_walk_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, PROF_PROG_MAX);
	__type(key, __u32);
	__type(value, __u32);
} prof_progs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PROF_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} prof_stats SEC(".maps");

static __always_inline void want(__u32 pid, __u32 why, __u64 start)
{
	struct want_key k = {.pid = pid, .why = why, .start = start};
	__u32 one = 1, *n;

	n = bpf_map_lookup_elem(&unwind_wanted, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&unwind_wanted, &k, &one, BPF_NOEXIST);
}

/* -EFAULT means there is no kernel stack (sample taken in user mode);
 * anything else is a lost stack. */
static __always_inline __s32 kernel_stack_id(void *ctx)
{
	long id;

	if (active)
		id = bpf_get_stackid(ctx, &prof_stacks1, 0);
	else
		id = bpf_get_stackid(ctx, &prof_stacks0, 0);
	if (id < 0 && id != -14 /* EFAULT */)
		otb_count(&prof_stats, PROF_STAT_KERNEL_STACK_LOST);
	return (__s32)id;
}

struct walk_regs {
	__u64 ip, sp, bp;
};

/* The user registers of the sampled thread: the sample's own when it was
 * taken in user mode (a user address: pt_regs.cs changed type in 6.9, so
 * the ip says it), else those the kernel saved on entry. */
static __always_inline int user_regs(struct bpf_perf_event_data *ctx, struct walk_regs *out)
{
	struct task_struct *task;
	struct pt_regs *saved;
	void *stack;

	out->ip = ctx->regs.ip;
	if (out->ip < (1ULL << 47)) {
		out->sp = ctx->regs.sp;
		out->bp = ctx->regs.bp;
		return 0;
	}
	task = (struct task_struct *)bpf_get_current_task();
	if (BPF_CORE_READ(task, flags) & PF_KTHREAD)
		return -1;
	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_task_pt_regs)) {
		saved = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	} else {
		stack = BPF_CORE_READ(task, stack);
		if (!stack)
			return -1;
		saved = stack + THREAD_SIZE_X86_64 - sizeof(struct pt_regs);
	}
	if (bpf_core_read(&out->ip, sizeof(out->ip), &saved->ip) ||
	    bpf_core_read(&out->sp, sizeof(out->sp), &saved->sp) ||
	    bpf_core_read(&out->bp, sizeof(out->bp), &saved->bp))
		return -1;
	return 0;
}

/* Branch-free binary search step: the verifier follows one path through
 * it instead of two per step (which made 2^steps paths per frame). `lo` and
 * `hi` only move while lo < hi. Returns the updated (lo, hi) via pointers. */
static __always_inline void search_step(__u64 *lo, __u64 *hi, __u64 mid, __u64 key, __u64 at_mid)
{
	__u64 active = (*lo - *hi) >> 63;		/* lo < hi */
	__u64 below = (key - at_mid) >> 63;		/* key < at_mid: search the lower half */
	__u64 go_up = active & (below ^ 1);
	__u64 go_down = active & below;

	*lo += (mid + 1 - *lo) & -go_up;
	*hi -= (*hi - mid) & -go_down;
}

static __always_inline struct unwind_mapping *find_mapping(struct unwind_proc *proc, __u64 pc)
{
	__u64 lo = 0, hi = proc->n, mid;
	struct unwind_mapping *m;

	if (hi > UNWIND_MAX_MAPPINGS)
		hi = UNWIND_MAX_MAPPINGS;
	if (pc >> 62)
		return NULL;	/* the search's sign trick needs pc < 2^63; user pcs are < 2^47 */
	for (int i = 0; i < UNWIND_MAP_SEARCH; i++) {
		mid = ((lo + hi) / 2) & (UNWIND_MAX_MAPPINGS - 1);
		search_step(&lo, &hi, mid, pc, proc->m[mid].start);
	}
	if (lo == 0)
		return NULL;
	m = &proc->m[(lo - 1) & (UNWIND_MAX_MAPPINGS - 1)];
	if (pc - m->start >= m->size)
		return NULL;
	return m;
}

static __always_inline struct unwind_row *find_row(struct unwind_mapping *m, __u64 addr)
{
	__u64 lo = m->table_start, hi;
	__u32 key;

	if (!m->table_len || addr > 0xffffffffULL)
		return NULL;
	hi = lo + m->table_len;
	for (int i = 0; i < UNWIND_ROW_SEARCH; i++) {
		struct unwind_row *r;

		/* mid <= hi <= the pool's last row + 1: user space never uses
		 * the pool's last row, so mid is always a valid index */
		key = (__u32)((lo + hi) / 2);
		r = bpf_map_lookup_elem(&unwind_rows, &key);
		if (!r)
			return NULL;
		search_step(&lo, &hi, key, addr, r->pc);
	}
	if (lo == m->table_start)
		return NULL;
	key = (__u32)(lo - 1);
	return bpf_map_lookup_elem(&unwind_rows, &key);
}

static __always_inline int read_user_u64(__u64 *out, __u64 addr)
{
	return bpf_probe_read_user(out, sizeof(*out), (void *)addr);
}

/* One frame: record s->pc and move s to the caller. 1 when the walk ends. */
static __always_inline int unwind_frame(struct prof_walk *s, struct unwind_proc *proc)
{
	struct unwind_mapping *m = NULL;
	struct unwind_row *row = NULL;
	__u64 pc = s->pc, lookup, cfa, ra;
	__u16 n = s->st.n_native;
	__u8 type = UNW_CFA_UNKNOWN;
	__s8 rbp_off8 = 0;

	if (n >= UNWIND_MAX_NATIVE) {
		s->st.flags |= UNW_F_TRUNCATED;
		return 1;
	}
	/* a pc a signal interrupted is where the thread was, not a return
	 * address: say so to the symbolizer (bit 63; user pcs are < 2^47) */
	s->st.slots[n & (UNWIND_MAX_NATIVE - 1)] = (n && s->exact_pc) ? pc | UNW_PC_EXACT : pc;
	s->st.n_native = n + 1;

	lookup = s->exact_pc ? pc : pc - 1;	/* a return address is just past its call */
	if (proc) {
		m = find_mapping(proc, lookup);
		if (!m)
			want(s->pid, WANT_REFRESH, 0);	/* a mapping newer than the table (dlopen, exec) */
		else if (!m->table_len && !(m->flags & UNW_MAP_NO_TABLE))
			want(s->pid, WANT_MAPPING, m->start);
		else
			row = find_row(m, lookup - m->bias);
	}
	if (row) {
		type = row->cfa_type;
		rbp_off8 = row->rbp_off8;
	}

	switch (type) {
	case UNW_CFA_END:
		s->st.flags |= UNW_F_COMPLETE;
		return 1;
	case UNW_CFA_RSP:
		cfa = s->sp + row->cfa_off;
		break;
	case UNW_CFA_RBP:
		if (!s->bp_valid)
			goto read_fail;
		cfa = s->bp + row->cfa_off;
		break;
	case UNW_CFA_PLT:
		cfa = s->sp + 8 + ((pc & 15) >= (__u64)row->cfa_off ? 8 : 0);
		break;
	case UNW_CFA_SIGNAL: {
		/* rt_sigframe: the ucontext is at rsp when the handler returns
		 * into the trampoline; mcontext gregs start at offset 40. */
		__u64 regs[3];	/* rbp (gregs[10]), rsp (gregs[15]), rip (gregs[16]) */

		if (read_user_u64(&regs[0], s->sp + 40 + 10 * 8) ||
		    read_user_u64(&regs[1], s->sp + 40 + 15 * 8) ||
		    read_user_u64(&regs[2], s->sp + 40 + 16 * 8))
			goto read_fail;
		s->bp = regs[0];
		s->bp_valid = 1;
		s->sp = regs[1];
		s->pc = regs[2];
		s->exact_pc = 1;	/* the interrupted instruction itself */
		return s->pc == 0;
	}
	case UNW_CFA_UNSUPPORTED:
		/* an expression or register rule: frame pointers in code that
		 * has them not is garbage, so the walk stops here */
		otb_count(&prof_stats, PROF_STAT_UNWIND_UNSUPPORTED);
		return 1;
	default:
		/* No row: frame pointers (rbp -> saved rbp, return address above it). */
		if (!s->bp_valid || s->bp == 0)
			return 1;
		s->st.flags |= UNW_F_FP_USED;
		otb_count(&prof_stats, PROF_STAT_UNWIND_FP_FRAMES);
		cfa = s->bp + 16;
		rbp_off8 = -2;
		break;
	}

	if (cfa <= s->sp) {	/* a frame must move up the stack: else garbage, or a loop */
		otb_count(&prof_stats, PROF_STAT_UNWIND_BAD_FRAME);
		return 1;
	}
	if (read_user_u64(&ra, cfa - 8))
		goto read_fail;
	if (rbp_off8 == UNW_RBP_LOST) {
		s->bp_valid = 0;
	} else if (rbp_off8) {
		if (read_user_u64(&s->bp, cfa + (__s64)rbp_off8 * 8))
			goto read_fail;
		s->bp_valid = 1;
	}
	s->sp = cfa;
	s->pc = ra;
	s->exact_pc = 0;
	if (ra == 0) {
		s->st.flags |= UNW_F_COMPLETE;
		return 1;
	}
	return 0;

read_fail:
	s->st.flags |= UNW_F_READ_FAIL;
	otb_count(&prof_stats, PROF_STAT_UNWIND_READ_FAIL);
	return 1;
}

/* FNV-1a over the used slots: the user stack's id. */
static __always_inline __u64 stack_hash(struct ustack *st)
{
	__u32 used = st->n_native + 2 * st->n_py;
	__u64 h = 0xcbf29ce484222325ULL ^ st->flags;

	for (int i = 0; i < UNWIND_MAX_SLOTS; i++) {
		if (i >= used)
			break;
		h ^= st->slots[i];
		h *= 0x100000001b3ULL;
	}
	return h ? h : 1;
}

static __always_inline void count(void *counts, struct prof_key *key)
{
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(counts, key);
	if (v) {
		__sync_fetch_and_add(v, 1);
		return;
	}
	if (bpf_map_update_elem(counts, key, &one, BPF_NOEXIST) == 0)
		return;
	v = bpf_map_lookup_elem(counts, key);	/* another CPU inserted it first */
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		otb_count(&prof_stats, PROF_STAT_COUNTS_FULL);
}

static __always_inline void record(struct prof_walk *s, bool has_user)
{
	struct prof_key key = {};

	key.pid = s->pid;
	key.kernel_stack = s->kernel_stack;
	__builtin_memcpy(key.comm, s->comm, sizeof(key.comm));
	key.req = s->req;
	if (has_user) {
		if (s->st.flags & UNW_F_TRUNCATED)
			otb_count(&prof_stats, PROF_STAT_UNWIND_TRUNCATED);
		key.user_stack = stack_hash(&s->st);
		if (!bpf_map_lookup_elem(&prof_ustacks, &key.user_stack) &&
		    bpf_map_update_elem(&prof_ustacks, &key.user_stack, &s->st, BPF_ANY)) {
			otb_count(&prof_stats, PROF_STAT_USER_STACK_LOST);
			key.user_stack = 0;
		}
	}
	/* Two call sites, one per buffer: the verifier wants a fixed map per call. */
	if (active)
		count(&prof_counts1, &key);
	else
		count(&prof_counts0, &key);
}

/* The request the sampled thread serves, if any, into req; the request
 * counts the sample (its span says how many it got). */
static __always_inline void sampled_request(__u32 tid, struct prof_request *req)
{
	struct thread_request *t = tid ? thread_request_slot(tid) : NULL;

	__builtin_memset(req, 0, sizeof(*req));
	if (!t || t->tid != tid)
		return;
	THREAD_REQ_ORDER();
	req->route = t->route;
	req->span_id = t->span_id;
	__builtin_memcpy(req->trace_id, t->trace_id, sizeof(req->trace_id));
	req->method = t->method;
	req->in_request = 1;
	__sync_fetch_and_add(&t->samples, 1);
	otb_count(&prof_stats, PROF_STAT_IN_REQUEST);
}

static __always_inline struct prof_walk *scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&prof_walk_scratch, &zero);
}

/* Walks UNWIND_FRAMES_PER_CALL frames, then calls itself for the next ones;
 * at the end, reads the interpreter's frames or records the sample. */
SEC("perf_event")
int prof_unwind(struct bpf_perf_event_data *ctx)
{
	struct prof_walk *s = scratch();
	struct unwind_proc *proc;
	int done = 0;

	if (!s)
		return 0;
	proc = bpf_map_lookup_elem(&unwind_procs, &s->pid);
	for (int i = 0; i < UNWIND_FRAMES_PER_CALL; i++) {
		done = unwind_frame(s, proc);
		if (done)
			break;
	}
	if (!done)
		bpf_tail_call(ctx, &prof_progs, PROF_PROG_UNWIND);
	if (done && s->py)
		bpf_tail_call(ctx, &prof_progs, PROF_PROG_PYTHON);
	if (!done)
		otb_count(&prof_stats, PROF_STAT_TAIL_CALL_FAIL);	/* past the kernel's tail-call limit */
	record(s, true);
	return 0;
}

SEC("perf_event")
int prof_python(struct bpf_perf_event_data *ctx)
{
	struct prof_walk *s = scratch();

	if (!s)
		return 0;
	py_walk(&s->st, s->pid, s->tid);
	record(s, true);
	return 0;
}

SEC("perf_event")
int prof_sample(struct bpf_perf_event_data *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid >> 32;
	struct prof_walk *s;
	struct walk_regs regs;

	otb_count(&prof_stats, PROF_STAT_SAMPLES);
	if (pid == 0) {
		otb_count(&prof_stats, PROF_STAT_IDLE);
		if (drop_idle)
			return 0;
	}
	s = scratch();
	if (!s)
		return 0;
	s->pid = pid;
	s->tid = (__u32)pid_tgid;
	s->kernel_stack = kernel_stack_id(ctx);
	bpf_get_current_comm(&s->comm, sizeof(s->comm));
	sampled_request(s->tid, &s->req);
	s->st.n_native = 0;
	s->st.n_py = 0;
	s->st.flags = 0;
	if (pid == 0 || user_regs(ctx, &regs)) {
		record(s, false);	/* no user stack: the idle task or a kernel thread */
		return 0;
	}
	s->pc = regs.ip;
	s->sp = regs.sp;
	s->bp = regs.bp;
	s->bp_valid = 1;
	s->exact_pc = 1;
	s->py = bpf_map_lookup_elem(&py_procs, &pid) != NULL;
	if (!bpf_map_lookup_elem(&unwind_procs, &pid)) {
		s->st.flags |= UNW_F_NO_PROC;
		otb_count(&prof_stats, PROF_STAT_UNWIND_NO_TABLE);
		want(pid, WANT_PROCESS, 0);
	}
	bpf_tail_call(ctx, &prof_progs, PROF_PROG_UNWIND);
	otb_count(&prof_stats, PROF_STAT_TAIL_CALL_FAIL);
	record(s, false);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
