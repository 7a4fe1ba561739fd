/* SPDX-License-Identifier: GPL-2.0 */
/* CPython frames at sample time: py_walk() finds the sampled thread's
 * PyThreadState through _PyRuntime and copies its interpreter frame chain,
 * innermost first, into a walked stack (struct ustack, unwind.h) after its
 * native frames. User space (collector/unwind/python.py) fills py_procs with
 * the address of _PyRuntime and the structure offsets of the process's
 * CPython version, and later turns the pairs into function, file and line.
 *
 * A Python pair in ustack.slots (st->slots[n_native + 2*i], i < n_py):
 *   slot 0: address of the frame's code object (PyCodeObject *)
 *   slot 1: bits 0..31  instruction offset in code units (2-byte
 *                       _Py_CODEUNITs) from the start of the bytecode;
 *           bit 32      PY_PAIR_ENTRY: this frame is the outermost frame of
 *                       one _PyEval_EvalFrameDefault call, so the frames up
 *                       to and including it replace that native frame
 *                       (3.8-3.10: every frame; 3.11: is_entry; 3.12+: the
 *                       frame just inside a FRAME_OWNED_BY_CSTACK shim);
 *           bit 33      PY_PAIR_NO_INSTR: the frame has not started (f_lasti
 *                       -1, or an instruction pointer before the bytecode):
 *                       bits 0..31 are 0, its line is the first line.
 * UNW_F_PY is set once the thread's PyThreadState was found (n_py may be 0:
 * a thread in C code with no Python frame); UNW_F_PY_TRUNC when the chain
 * went on past UNWIND_MAX_PY frames (the outermost ones are missing).
 *
 * Only bpf_probe_read_user and plain bounded loops (no bpf_loop): verifies
 * on 5.10+ (tests/test_python_frames.py boots 5.10). Each frame is one
 * BPF-to-BPF call (py_step); a program that also tail-calls may do so on
 * x86-64 since 5.10, with at most 256 bytes of stack per frame.
 * Include after vmlinux.h and bpf_helpers.h. x86-64 only (the 3.8-3.10
 * thread match reads the task's fsbase). */
#ifndef OTB_UNWIND_PYTHON_H
#define OTB_UNWIND_PYTHON_H

#include <bpf/bpf_core_read.h>
#include "unwind.h"

#define PY_PAIR_ENTRY		(1ULL << 32)
#define PY_PAIR_NO_INSTR	(1ULL << 33)

/* py_proc.frames: how a version lays out its frame chain */
enum py_frames {
	PY_FRAMES_LASTI_BYTES = 1,	/* 3.8, 3.9: PyFrameObject, f_lasti in bytes */
	PY_FRAMES_LASTI_UNITS,		/* 3.10: PyFrameObject, f_lasti in code units */
	PY_FRAMES_IS_ENTRY,		/* 3.11: _PyInterpreterFrame with is_entry */
	PY_FRAMES_OWNER,		/* 3.12, 3.13: _PyInterpreterFrame, shim frames owned by the C stack */
};

/* py_proc.tid_match: how the sampled thread's PyThreadState is recognised */
enum py_tid_match {
	PY_TID_NATIVE = 1,	/* tstate->native_thread_id == the thread's id (3.11+, same pid namespace) */
	PY_TID_PTHREAD,		/* tstate->thread_id (pthread_self) == the task's fsbase */
};

#define PY_NO_OFF 0xffff		/* cframe_current: no _PyCFrame indirection */
#define PY_OWNED_BY_CSTACK 3		/* enum _frameowner, 3.12 and 3.13 */
#define PY_MAX_THREADS 128		/* PyThreadStates looked at per sample */
#define PY_MAX_SHIMS 16			/* shim frames skipped on top of UNWIND_MAX_PY */

/* Filled by user space; offsets in bytes. 40 bytes. */
struct py_proc {
	__u64 runtime;			/* address of _PyRuntime in the process */
	__u16 version;			/* 0x030b for 3.11 (diagnostics only) */
	__u8 frames;			/* enum py_frames */
	__u8 tid_match;			/* enum py_tid_match */
	__u16 runtime_interp_head;	/* _PyRuntimeState.interpreters.head */
	__u16 interp_threads_head;	/* PyInterpreterState.threads.head (tstate_head before 3.11) */
	__u16 tstate_next;
	__u16 tstate_tid;		/* native_thread_id or thread_id, as tid_match says */
	__u16 tstate_frame;		/* frame (<3.11), cframe (3.11, 3.12), current_frame (3.13) */
	__u16 cframe_current;		/* _PyCFrame.current_frame, or PY_NO_OFF */
	__u16 frame_previous;		/* f_back / previous */
	__u16 frame_code;		/* f_code / f_executable */
	__u16 frame_instr;		/* f_lasti (int) / prev_instr / instr_ptr */
	__u16 frame_entry;		/* is_entry (3.11) */
	__u16 frame_owner;		/* owner (3.12+) */
	__u16 code_adaptive;		/* PyCodeObject.co_code_adaptive (3.11+) */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);		/* tgid */
	__type(value, struct py_proc);
} py_procs SEC(".maps");

static __always_inline __u64 py_ptr(__u64 addr)
{
	__u64 v = 0;

	if (bpf_probe_read_user(&v, sizeof(v), (const void *)addr))
		return 0;
	return v;
}

static __always_inline __u8 py_byte(__u64 addr)
{
	__u8 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (const void *)addr);
	return v;
}

/* The sampled thread's PyThreadState, or 0. Only the newest interpreter's
 * threads are looked at (the main one unless subinterpreters were made). */
static __always_inline __u64 py_tstate(const struct py_proc *pp, __u32 tid)
{
	__u64 want = tid, interp, ts;
	int i;

	if (pp->tid_match == PY_TID_PTHREAD) {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();

		want = BPF_CORE_READ(task, thread.fsbase);
	}
	interp = py_ptr(pp->runtime + pp->runtime_interp_head);
	if (!interp)
		return 0;
	ts = py_ptr(interp + pp->interp_threads_head);
	for (i = 0; i < PY_MAX_THREADS && ts; i++) {
		if (py_ptr(ts + pp->tstate_tid) == want)
			return ts;
		ts = py_ptr(ts + pp->tstate_next);
	}
	return 0;
}

/* Slot 1 of a pair: instruction offset and flags (see the top). */
static __always_inline __u64 py_word(const struct py_proc *pp, __u64 frame, __u64 code)
{
	__u64 word, instr_ptr;
	__s32 lasti = -1;
	__s64 off;

	if (pp->frames == PY_FRAMES_LASTI_BYTES || pp->frames == PY_FRAMES_LASTI_UNITS) {
		bpf_probe_read_user(&lasti, sizeof(lasti), (const void *)(frame + pp->frame_instr));
		if (lasti < 0)
			word = PY_PAIR_NO_INSTR;
		else
			word = pp->frames == PY_FRAMES_LASTI_BYTES ? (__u32)lasti / 2 : (__u32)lasti;
		return word | PY_PAIR_ENTRY;	/* one eval call per frame */
	}
	instr_ptr = py_ptr(frame + pp->frame_instr);
	off = (__s64)(instr_ptr - (code + pp->code_adaptive));
	word = off < 0 || off >= (1LL << 32) ? PY_PAIR_NO_INSTR : (__u64)off / 2;
	if (pp->frames == PY_FRAMES_IS_ENTRY && py_byte(frame + pp->frame_entry))
		word |= PY_PAIR_ENTRY;
	return word;
}

/* One frame of the chain: records it (or, for a shim, flags the frame
 * before it) and returns the next one, 0 to stop. A function of its own
 * (a BPF-to-BPF call) so that the loop around it stays a plain counted
 * loop: clang lays out a big inlined body so that the loop falls through
 * into its head, which 5.10's verifier rejects as a back-edge. */
static __noinline __u64 py_step(struct ustack *st, const struct py_proc *pp, __u64 frame, __u32 base)
{
	__u64 code, idx;
	__u32 n = st->n_py;

	if (pp->frames == PY_FRAMES_OWNER &&
	    py_byte(frame + pp->frame_owner) == PY_OWNED_BY_CSTACK) {
		/* the shim _PyEval_EvalFrameDefault pushes on entry: the
		 * frame inside it (the one before) ends that call's group */
		idx = base + 2 * (__u64)n - 1;
		if (n && idx < UNWIND_MAX_SLOTS)
			st->slots[idx] |= PY_PAIR_ENTRY;
		return py_ptr(frame + pp->frame_previous);
	}
	if (n >= UNWIND_MAX_PY) {
		st->flags |= UNW_F_PY_TRUNC;
		return 0;
	}
	idx = base + 2 * (__u64)n;
	if (idx + 1 >= UNWIND_MAX_SLOTS)
		return 0;
	code = py_ptr(frame + pp->frame_code);
	st->slots[idx] = code;
	st->slots[idx + 1] = py_word(pp, frame, code);
	st->n_py = n + 1;
	return py_ptr(frame + pp->frame_previous);
}

static __always_inline void py_walk(struct ustack *st, __u32 pid, __u32 tid)
{
	const struct py_proc *pp = bpf_map_lookup_elem(&py_procs, &pid);
	__u64 ts, frame;
	__u32 base;
	int i;

	if (!pp)
		return;
	ts = py_tstate(pp, tid);
	if (!ts)
		return;
	st->flags |= UNW_F_PY;
	frame = py_ptr(ts + pp->tstate_frame);
	if (pp->cframe_current != PY_NO_OFF && frame)
		frame = py_ptr(frame + pp->cframe_current);
	base = st->n_native;
	if (base > UNWIND_MAX_NATIVE)
		base = UNWIND_MAX_NATIVE;
	st->n_py = 0;
	for (i = 0; i < UNWIND_MAX_PY + PY_MAX_SHIMS && frame; i++)
		frame = py_step(st, pp, frame, base);
}

#endif
