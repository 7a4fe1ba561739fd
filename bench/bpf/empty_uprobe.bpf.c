// SPDX-License-Identifier: GPL-2.0
/* Empty uprobe and uretprobe programs: what a probe hit costs by itself. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("uprobe")
int BPF_KPROBE(empty_uprobe) { return 0; }

SEC("uretprobe")
int BPF_KRETPROBE(empty_uretprobe) { return 0; }

char LICENSE[] SEC("license") = "GPL";
