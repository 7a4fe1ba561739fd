// SPDX-License-Identifier: GPL-2.0
/* UDP traffic per (socket, remote endpoint, direction) and DNS messages per
 * (socket, query type, response code), counted in the kernel.
 *
 *  - cgroup_skb ingress/egress on the cgroup v2 root: every UDP datagram of
 *    every process, IPv4 and IPv6, with its real remote address (unconnected
 *    sockets included), keyed by socket cookie;
 *  - tp_btf sock_send_length / sock_recv_length: which process owns a UDP
 *    socket (cookie -> tgid, comm), recorded from the process's own
 *    send/receive.
 *
 * User space joins the two by cookie. The cgroup_skb programs always let the
 * packet through.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "otb_stats.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IPPROTO_UDP 17
#define AF_INET 2
#define AF_INET6 10
#define DNS_PORT 53
#define DNS_MAX_NAME 128	/* QNAME bytes scanned for the question's type */

enum udp_dir { DIR_TRANSMIT = 1, DIR_RECEIVE = 2 };
enum udp_stat { UDP_STAT_TABLE_FULL = 0, UDP_STAT_DNS_TABLE_FULL, UDP_STAT_MAX };

struct udp_key {
	__u64 cookie;
	__u8 addr[16];		/* remote address, IPv4 as ::ffff:a.b.c.d */
	__u16 port;		/* remote port */
	__u8 family;		/* AF_INET / AF_INET6 */
	__u8 dir;
	__u16 local_port;	/* kept for servers: the port they serve on */
	__u16 pad[3];
};

struct udp_val {
	__u64 bytes;		/* UDP payload */
	__u64 packets;
};

struct dns_key {
	__u64 cookie;
	__u16 qtype;
	__u8 rcode;
	__u8 is_response;
	__u8 dir;
	__u8 pad[3];
};

struct udp_owner {
	__u32 tgid;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct udp_key);
	__type(value, struct udp_val);
} udp_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct dns_key);
	__type(value, __u64);
} udp_dns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);		/* socket cookie */
	__type(value, struct udp_owner);
} udp_owners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UDP_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} udp_counters SEC(".maps");

struct dns_hdr {
	__u16 id;
	__u16 flags;
	__u16 qdcount;
	__u16 ancount;
	__u16 nscount;
	__u16 arcount;
};

/* Query type of the first question: skip QNAME's labels (bounded), read QTYPE. */
static __always_inline __u16 dns_qtype(struct __sk_buff *skb, __u32 off)
{
	__u32 pos = off;
	__u16 qtype = 0;
	__u8 len;

	for (int i = 0; i < DNS_MAX_NAME; i++) {
		if (bpf_skb_load_bytes(skb, pos, &len, 1))
			return 0;
		if (len == 0)
			break;
		if (len & 0xC0)	/* a compression pointer: not in a question's first name */
			return 0;
		pos += len + 1;
		if (pos > off + DNS_MAX_NAME)
			return 0;
	}
	if (bpf_skb_load_bytes(skb, pos + 1, &qtype, 2))
		return 0;
	return bpf_ntohs(qtype);
}

static __always_inline void count_dns(struct __sk_buff *skb, __u64 cookie, __u32 off, __u8 dir)
{
	struct dns_hdr h;
	struct dns_key k = {};
	__u64 one = 1, *v;
	__u16 flags;

	if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)))
		return;
	flags = bpf_ntohs(h.flags);
	k.cookie = cookie;
	k.is_response = flags >> 15;
	k.rcode = flags & 0xF;
	k.dir = dir;
	if (bpf_ntohs(h.qdcount) >= 1)
		k.qtype = dns_qtype(skb, off + sizeof(h));
	v = bpf_map_lookup_elem(&udp_dns, &k);
	if (v)
		__sync_fetch_and_add(v, 1);
	else if (bpf_map_update_elem(&udp_dns, &k, &one, BPF_NOEXIST))
		otb_count(&udp_counters, UDP_STAT_DNS_TABLE_FULL);
}

static __always_inline int count_udp(struct __sk_buff *skb, __u8 dir)
{
	struct udp_key k = {};
	struct udphdr uh;
	struct udp_val *v, init = {};
	struct bpf_sock *sk;
	__u32 l4;
	__u16 payload, rport, lport;

	/* Every packet of the host comes here: leave TCP and the rest on the
	 * socket's protocol, before touching packet bytes. */
	sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_UDP)
		return 1;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) || ip.protocol != IPPROTO_UDP)
			return 1;
		if (ip.frag_off & bpf_htons(0x1FFF))
			return 1;	/* a later fragment: no UDP header */
		l4 = ip.ihl * 4;
		k.family = AF_INET;
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		__builtin_memcpy(&k.addr[12], dir == DIR_TRANSMIT ? (void *)&ip.daddr : (void *)&ip.saddr, 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) || ip6.nexthdr != IPPROTO_UDP)
			return 1;	/* extension headers are left out */
		l4 = sizeof(ip6);
		k.family = AF_INET6;
		__builtin_memcpy(k.addr, dir == DIR_TRANSMIT ? (void *)&ip6.daddr : (void *)&ip6.saddr, 16);
	} else {
		return 1;
	}
	if (bpf_skb_load_bytes(skb, l4, &uh, sizeof(uh)))
		return 1;
	rport = bpf_ntohs(dir == DIR_TRANSMIT ? uh.dest : uh.source);
	lport = bpf_ntohs(dir == DIR_TRANSMIT ? uh.source : uh.dest);
	payload = bpf_ntohs(uh.len) - sizeof(uh);

	k.cookie = bpf_get_socket_cookie(skb);
	k.port = rport;
	k.dir = dir;
	k.local_port = lport;
	v = bpf_map_lookup_elem(&udp_traffic, &k);
	if (!v) {
		bpf_map_update_elem(&udp_traffic, &k, &init, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&udp_traffic, &k);
		if (!v) {
			otb_count(&udp_counters, UDP_STAT_TABLE_FULL);
			return 1;
		}
	}
	__sync_fetch_and_add(&v->bytes, payload);
	__sync_fetch_and_add(&v->packets, 1);

	if (rport == DNS_PORT || lport == DNS_PORT)
		count_dns(skb, k.cookie, l4 + sizeof(uh), dir);
	return 1;
}

SEC("cgroup_skb/egress")
int udp_egress(struct __sk_buff *skb)
{
	return count_udp(skb, DIR_TRANSMIT);
}

SEC("cgroup_skb/ingress")
int udp_ingress(struct __sk_buff *skb)
{
	return count_udp(skb, DIR_RECEIVE);
}

static __always_inline int note_owner(struct sock *sk)
{
	struct udp_owner o = {}, *known;
	__u32 tgid;
	__u64 cookie;

	if (sk->sk_protocol != IPPROTO_UDP)
		return 0;
	cookie = bpf_get_socket_cookie(sk);
	tgid = bpf_get_current_pid_tgid() >> 32;
	known = bpf_map_lookup_elem(&udp_owners, &cookie);
	if (known && known->tgid == tgid)
		return 0;	/* the common case: no write per datagram */
	o.tgid = tgid;
	bpf_get_current_comm(&o.comm, sizeof(o.comm));
	bpf_map_update_elem(&udp_owners, &cookie, &o, BPF_ANY);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(udp_owner_send, struct sock *sk, int ret, int flags)
{
	return note_owner(sk);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(udp_owner_recv, struct sock *sk, int ret, int flags)
{
	return note_owner(sk);
}

char LICENSE[] SEC("license") = "GPL";
