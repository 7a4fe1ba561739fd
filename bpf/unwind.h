/* SPDX-License-Identifier: GPL-2.0 */
/* What the profiler's stack walker and user space (collector/unwind) share:
 * the compact unwind rows built from a binary's .eh_frame/.debug_frame, the
 * per-process mapping table that says which rows cover which addresses, and
 * the per-CPU scratch the walk keeps between its tail calls. x86-64 only. */
#ifndef OTB_UNWIND_H
#define OTB_UNWIND_H

/* How to find the caller's frame (the CFA: the stack pointer before the call
 * that made this frame; the return address is at CFA-8 on x86-64). */
enum unwind_cfa {
	UNW_CFA_UNKNOWN = 0,	/* no call-frame information covers this pc: frame pointers */
	UNW_CFA_RSP,		/* CFA = rsp + cfa_off */
	UNW_CFA_RBP,		/* CFA = rbp + cfa_off */
	UNW_CFA_PLT,		/* PLT stub: CFA = rsp + 8, + 8 more once (pc & 15) >= cfa_off */
	UNW_CFA_SIGNAL,		/* signal trampoline: registers saved in the ucontext at rsp */
	UNW_CFA_END,		/* return address undefined: the outermost frame (_start, clone) */
	UNW_CFA_UNSUPPORTED,	/* a rule the walker cannot follow (expression, other register) */
};

/* rbp_off8: 0 = rbp keeps its value in the caller; n = saved at CFA + 8*n;
 * UNW_RBP_LOST = restored by a rule the walker cannot follow. */
#define UNW_RBP_LOST (-128)

/* One row: from `pc` (the binary's link-time virtual address) up to the next
 * row's pc. Rows of a binary are sorted by pc; a gap between FDEs is an
 * UNW_CFA_UNKNOWN row. 8 bytes. */
struct unwind_row {
	__u32 pc;
	__s16 cfa_off;
	__u8 cfa_type;
	__s8 rbp_off8;
};

/* One executable mapping of a process. A pc in [start, start+size) is at
 * link-time address pc - bias in its binary; its rows are
 * unwind_rows[table_start .. table_start+table_len), none if table_len is 0
 * (no table yet, or none can be built: frame pointers). */
struct unwind_mapping {
	__u64 start;
	__u64 bias;
	__u32 size;
	__u32 table_start;
	__u32 table_len;
	__u32 flags;		/* UNW_MAP_* */
};

#define UNW_MAP_NO_TABLE 1	/* never gets rows (JIT code, no CFI): frame pointers, nothing to ask for */

#define UNWIND_MAX_MAPPINGS 128	/* per process, sorted by start; the rest: frame pointers */

struct unwind_proc {
	__u32 n;
	__u32 gen;		/* bumped by user space at each refresh */
	struct unwind_mapping m[UNWIND_MAX_MAPPINGS];
};

/* A walked user stack: native return addresses first (n_native), then, for
 * an interpreter, its frames as pairs of slots (n_py pairs), innermost
 * first. A Python pair is (code object address, instruction offset | flags);
 * see unwind_python.h. */
#define UNWIND_MAX_NATIVE 128
#define UNWIND_MAX_PY 48
#define UNWIND_MAX_SLOTS (UNWIND_MAX_NATIVE + 2 * UNWIND_MAX_PY)

/* A native slot after the first with this bit is the pc a signal
 * interrupted (symbolized as is), not a return address (symbolized at -1). */
#define UNW_PC_EXACT (1ULL << 63)

/* ustack flags */
#define UNW_F_COMPLETE	1	/* reached an outermost frame (UNW_CFA_END) or a zero return address */
#define UNW_F_TRUNCATED	2	/* stopped at UNWIND_MAX_NATIVE */
#define UNW_F_FP_USED	4	/* at least one frame came from frame pointers */
#define UNW_F_READ_FAIL	8	/* a stack read failed: the walk stopped there */
#define UNW_F_PY_TRUNC	16	/* more Python frames than UNWIND_MAX_PY */
#define UNW_F_PY	32	/* Python frames were read (n_py may still be 0) */
#define UNW_F_NO_PROC	64	/* the process had no mapping table yet: frame pointers only */

struct ustack {
	__u16 n_native;
	__u16 n_py;
	__u32 flags;
	__u64 slots[UNWIND_MAX_SLOTS];
};

#endif
