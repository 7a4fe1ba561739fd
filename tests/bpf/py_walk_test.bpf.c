// SPDX-License-Identifier: GPL-2.0
/* Drives bpf/unwind_python.h's py_walk on its own: a perf_event program
 * samples one target process and sends each sample's Python frames (no
 * native walk: n_native stays 0) to user space through a ring buffer. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "unwind_python.h"

const volatile __u32 target_tgid = 0;

struct py_sample {
	__u32 tid;
	__u32 pad;
	struct ustack st;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct py_sample);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} samples SEC(".maps");

SEC("perf_event")
int py_walk_sample(struct bpf_perf_event_data *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	struct py_sample *s;

	if (pid_tgid >> 32 != target_tgid)
		return 0;
	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return 0;
	s->tid = (__u32)pid_tgid;
	s->st.n_native = 0;
	s->st.n_py = 0;
	s->st.flags = 0;
	py_walk(&s->st, pid_tgid >> 32, (__u32)pid_tgid);
	bpf_ringbuf_output(&samples, s, sizeof(*s), 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
