// SPDX-License-Identifier: GPL-2.0
/* A row pool shaped like cpu_profile's unwind_rows (an mmapable array of
 * struct unwind_row, a size that is no multiple of a page), for
 * tests/test_agent_memory.py. No programs: only the map is used. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "unwind.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 3000);
	__type(key, __u32);
	__type(value, struct unwind_row);
} unwind_rows SEC(".maps");

char LICENSE[] SEC("license") = "GPL";
