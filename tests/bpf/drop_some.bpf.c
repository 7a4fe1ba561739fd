// SPDX-License-Identifier: GPL-2.0
/* tc program for tests: drops every DROP_EVERY-th large (data) packet, to
 * provoke retransmissions deterministically (this kernel has no netem).
 * Attach it where the receiver gets packets: a sender's own egress drop is
 * reported back to TCP, which then resends without a retransmission. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define DROP_EVERY 20

__u64 seen = 0;
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800

SEC("tc")
int drop_some(struct __sk_buff *skb)
{
	/* only large frames (data, not handshakes or pure ACKs) */
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->len < 200)
		return TC_ACT_OK;
	return __sync_fetch_and_add(&seen, 1) % DROP_EVERY == DROP_EVERY - 1 ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
