// SPDX-License-Identifier: GPL-2.0
/* tc egress program for tests: drops about DROP_PERCENT% of TCP data
 * packets, to provoke retransmissions (this kernel has no netem). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define DROP_PERCENT 3
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800

SEC("tc")
int drop_some(struct __sk_buff *skb)
{
	/* only large frames (data, not handshakes or pure ACKs) */
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->len < 200)
		return TC_ACT_OK;
	return bpf_get_prandom_u32() % 100 < DROP_PERCENT ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
