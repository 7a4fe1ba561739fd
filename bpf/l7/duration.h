/* SPDX-License-Identifier: GPL-2.0 */
/* Durations into the buckets every L7 protocol's histograms use: log2 of
 * 2^-30 s units (OTLP's scale-0 exponential buckets in seconds) and the
 * semantic conventions' explicit bounds. */
#ifndef OTB_L7_DURATION_H
#define OTB_L7_DURATION_H

#include "log2_hist.h"

#define SEM_BUCKETS 15		/* semantic-convention bounds 5 ms .. 10 s, plus +Inf */

/* (bound - d) >> 63 is 1 when d > bound (both below 2^63): no branches, so
 * the verifier does not split its states 14 times */
#define GT(d, bound) (((__u64)(bound) - (d)) >> 63)

static __always_inline __u32 sem_bucket(__u64 d)
{
	/* bounds (s): .005 .01 .025 .05 .075 .1 .25 .5 .75 1 2.5 5 7.5 10 */
	return GT(d, 5000000ULL) + GT(d, 10000000ULL) + GT(d, 25000000ULL) + GT(d, 50000000ULL) +
	       GT(d, 75000000ULL) + GT(d, 100000000ULL) + GT(d, 250000000ULL) + GT(d, 500000000ULL) +
	       GT(d, 750000000ULL) + GT(d, 1000000000ULL) + GT(d, 2500000000ULL) + GT(d, 5000000000ULL) +
	       GT(d, 7500000000ULL) + GT(d, 10000000000ULL);
}

/* One duration (ns) into a histogram's count, sum and both bucket sets. */
static __always_inline void l7_count_duration(__u64 *count, __u64 *sum_ns, __u64 *log2, __u64 *sem, __u64 dur)
{
	/* The log2 buckets count the duration in units of 2^-30 s: bucket i
	 * holds (2^(i-1), 2^i] units = (2^(i-31), 2^(i-30)] s, which is OTLP's
	 * scale-0 exponential bucket i-31 in seconds (EXP_OFFSET = -30 in
	 * probes/http.py). units = dur_ns * 2^30 / 10^9 (x 1.073741824),
	 * rounded up: a duration a hair above a power-of-two edge must stay in
	 * the upper bucket, and ceil keeps that exact (an edge 2^k is a whole
	 * number of units, so ceil(x) > 2^(k-1) exactly when x > 2^(k-1)).
	 * Split at whole seconds so nothing overflows: q <= 2^43 / 10^9 < 2^14,
	 * so q << 30 < 2^44; r < 10^9 < 2^30, so (r << 30) + 10^9 - 1 < 2^61. */
	const __u32 unit_shift = 30;		/* 1 unit = 2^-30 s */

	if (dur > (1ULL << 43))
		dur = 1ULL << 43;	/* ~2.4 hours: past the last bucket ((256, 512] s) anyway */
	__u64 d30;

	if (dur < NS_PER_S) {
		/* q = 0: one division, not three (most requests take < 1 s) */
		d30 = ((dur << unit_shift) + NS_PER_S - 1) / NS_PER_S;
	} else {
		__u64 q = dur / NS_PER_S, r = dur % NS_PER_S;

		d30 = (q << unit_shift) + ((r << unit_shift) + NS_PER_S - 1) / NS_PER_S;
	}
	__u32 lb = hide(otb_log2_bucket(d30));
	__u32 sb = hide(sem_bucket(dur));

	__sync_fetch_and_add(count, 1);
	__sync_fetch_and_add(sum_ns, dur);
	if (lb < OTB_LOG2_BUCKETS)
		__sync_fetch_and_add(&log2[lb], 1);
	if (sb < SEM_BUCKETS)
		__sync_fetch_and_add(&sem[sb], 1);
}


#endif
