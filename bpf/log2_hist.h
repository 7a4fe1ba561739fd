/* Log2 histogram helpers shared by probes.
 *
 * Bucket i counts values v with 2^(i-1) < v <= 2^i (bucket 0 holds v <= 1).
 * That is exactly OTLP's exponential histogram at scale 0 with offset -1, so
 * user space exports the kernel buckets without re-binning.
 */
#ifndef OTELBPF_LOG2_HIST_H
#define OTELBPF_LOG2_HIST_H

/* 40 buckets reach 2^39 ns (~9 minutes); longer values land in the last one. */
#define OTB_LOG2_BUCKETS 40

/* floor(log2(v)) for v >= 1, branchless: a handful of ALU ops, no loop, so
 * the verifier sees straight-line code and the hot path stays cheap. */
static __always_inline __u32 otb_floor_log2(__u64 v)
{
	__u32 r, shift;

	r = (v > 0xFFFFFFFFULL) << 5;
	v >>= r;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

/* Index of the bucket (2^(i-1), 2^i] holding v, clamped to the last bucket. */
static __always_inline __u32 otb_log2_bucket(__u64 v)
{
	__u64 b = v <= 1 ? 0 : otb_floor_log2(v - 1) + 1;

	/* Clamp the very register the caller indexes with. Without the barrier
	 * clang 14 tests a zero-extended copy and indexes with the original,
	 * and verifiers before 6.2 (Debian's 5.10 and 6.1) do not carry the
	 * bound across that copy: "unbounded memory access". */
	asm volatile("" : "+r"(b));
	if (b > OTB_LOG2_BUCKETS - 1)
		b = OTB_LOG2_BUCKETS - 1;
	return b;
}

#endif
