/* Per-CPU drop/overflow counters shared by probes: a PERCPU_ARRAY of u64
 * indexed by the probe's own enum, summed by user space (Map.counters). */
#ifndef OTELBPF_STATS_H
#define OTELBPF_STATS_H

static __always_inline void otb_count(void *percpu_counters, __u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(percpu_counters, &idx);

	if (v)
		*v += 1;	/* per-CPU: no atomic needed */
}

#endif
