// SPDX-License-Identifier: GPL-2.0
/* TCP flows, aggregated in the kernel per (process, role, remote address,
 * port). Stable hooks only:
 *
 *  - tracepoint sock:inet_sock_set_state: connect (owner captured in the
 *    connecting process), listen (owner of a port), established, close,
 *    failed connect (sk_err), reset;
 *  - tracepoints sock:sock_send_length / sock_recv_length (6.x): live
 *    connections report their counters at most every report_ns while they
 *    send or receive, in every network namespace;
 *  - iter/tcp, run by user space every interval: the same for established
 *    connections of the agent's network namespace, and adoption of
 *    connections that predate the agent (counted from then on).
 *
 * Bytes are the socket's own counters: sent = bytes_sent - bytes_retrans
 * (payload, each byte once however often it was retransmitted; bytes_acked
 * would also count the FIN's sequence number), received = bytes_received,
 * less the one sequence number of a received FIN. Each connection remembers what
 * it already reported; the iterator and the close path add only the rest.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "otb_stats.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "log2_hist.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define ECONNRESET 104
#define RTT_BUCKETS 32		/* log2 microseconds; a power of two so the index can be masked */
/* tcp_sock.srtt_us holds 8x the smoothed RTT in us (3 fraction bits, see
 * tcp_rtt_estimator); >> 3 gives us, as ss -ti's rtt (tcpi_rtt) does */
#define SRTT_SHIFT 3

enum flow_role { ROLE_UNKNOWN = 0, ROLE_CLIENT = 1, ROLE_SERVER = 2 };

enum flow_stat {
	FLOW_STAT_OVERFLOW = 0,		/* flows map full: counted in the overflow flow */
	FLOW_STAT_CONN_TABLE_FULL,	/* a connection could not be tracked */
	FLOW_STAT_CLOSE_UNTRACKED,	/* a close of a connection never seen open (predates the agent) */
	FLOW_STAT_CLOSED_AT_DESTROY,	/* finished at tcp_destroy_sock: no TCP_CLOSE was seen */
	FLOW_STAT_CLOSE_UNSEEN,		/* its socket address was reused: the close's events never ran */
	FLOW_STAT_OPEN_UNSEEN,		/* the iterator found it established: that event never ran */
	FLOW_STAT_MAX,
};

struct flow_key {
	__u32 tgid;
	__u8 role;
	__u8 family;		/* of the peer address: AF_INET for v4 and v4-mapped */
	__u16 port;		/* remote port (client role) or local port (server role) */
	__u8 addr[16];		/* peer address, IPv4 as ::ffff:a.b.c.d */
	__s32 err;		/* failed connects: the error; 0 otherwise */
	char comm[16];
};

struct flow_val {
	__u64 opened;
	__u64 closed;
	__u64 failed;
	__u64 resets;
	__u64 retransmits;
	__u64 bytes_sent;
	__u64 bytes_recv;
	__u64 segs_sent;
	__u64 segs_recv;
	__u64 rtt_sum_us;
	__u64 rtt_buckets[RTT_BUCKETS];
};

struct conn_info {
	struct flow_key key;
	__u64 start_ns;
	__u64 rep_sent;		/* counters already added to the flow */
	__u64 rep_recv;
	__u64 rep_segs_out;
	__u64 rep_segs_in;
	__u64 rep_retrans;
	__u64 last_report_ns;
	__u32 netns;
	__u32 seen_gen;		/* the iterator pass that last saw the socket alive */
	__u8 established;
};

struct owner {
	__u32 tgid;
	char comm[16];
};

/* Ports are per network namespace: pods may all listen on :8080. */
struct listener_key {
	__u32 netns;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flow_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);		/* struct sock * */
	__type(value, struct conn_info);
} flow_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listener_key);
	__type(value, struct owner);
} flow_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOW_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} flow_counters SEC(".maps");

/* An all-zero flow_val to insert from: too large for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_val);
} flow_zero SEC(".maps");

/* The key every flow falls back to when flow_stats is full; user space
 * inserts it before attaching, so it always exists. */
const volatile __u32 overflow_tgid = 0xFFFFFFFF;
/* The iterator's pass number, set by user space before each pass: an
 * entry the passes stop seeing belongs to a socket that is gone. */
__u32 iter_gen = 0;
/* Live connections report at most this often from the send/receive path. */
const volatile __u64 report_ns = 1000000000ULL;

static __always_inline struct flow_val *flow_get(struct flow_key *key)
{
	struct flow_val *v = bpf_map_lookup_elem(&flow_stats, key);
	struct flow_key ovf = {};
	__u32 zero_idx = 0;
	struct flow_val *zero;

	if (v)
		return v;
	zero = bpf_map_lookup_elem(&flow_zero, &zero_idx);
	if (!zero)
		return NULL;
	bpf_map_update_elem(&flow_stats, key, zero, BPF_NOEXIST);
	v = bpf_map_lookup_elem(&flow_stats, key);
	if (v)
		return v;
	otb_count(&flow_counters, FLOW_STAT_OVERFLOW);
	ovf.tgid = overflow_tgid;
	return bpf_map_lookup_elem(&flow_stats, &ovf);
}

static __always_inline void set_peer(struct flow_key *key, __u16 family, const __u8 *v4, const __u8 *v6)
{
	if (family == AF_INET) {
		key->family = AF_INET;
		key->addr[10] = 0xff;
		key->addr[11] = 0xff;
		__builtin_memcpy(&key->addr[12], v4, 4);
		return;
	}
	__builtin_memcpy(key->addr, v6, 16);
	/* v4-mapped IPv6 (a dual-stack socket talking IPv4) is IPv4 on the wire */
	if (!v6[0] && !v6[1] && !v6[2] && !v6[3] && !v6[4] && !v6[5] && !v6[6] && !v6[7] && !v6[8] && !v6[9] &&
	    v6[10] == 0xff && v6[11] == 0xff)
		key->family = AF_INET;
	else
		key->family = AF_INET6;
}

static __always_inline void add_rtt(struct flow_val *v, __u32 srtt_us)
{
	__u32 b = otb_log2_bucket(srtt_us);	/* (2^(b-1), 2^b] us, as every log2 histogram here */

	if (b >= RTT_BUCKETS)
		b = RTT_BUCKETS - 1;
	/* clang drops a mask it can prove redundant; the verifier cannot prove
	 * the clamp, so hide b from clang and keep the mask */
	asm volatile("" : "+r"(b));
	b &= RTT_BUCKETS - 1;
	__sync_fetch_and_add(&v->rtt_buckets[b], 1);
	__sync_fetch_and_add(&v->rtt_sum_us, srtt_us);
}

/* Add what the socket counted since the connection last reported. */
static __always_inline void report(struct conn_info *c, struct flow_val *v, __u64 sent, __u64 recv,
				   __u64 segs_out, __u64 segs_in, __u64 retrans)
{
	if (retrans > c->rep_retrans)
		__sync_fetch_and_add(&v->retransmits, retrans - c->rep_retrans);
	c->rep_retrans = retrans;
	if (sent > c->rep_sent)
		__sync_fetch_and_add(&v->bytes_sent, sent - c->rep_sent);
	if (recv > c->rep_recv) {
		__sync_fetch_and_add(&v->bytes_recv, recv - c->rep_recv);
		c->rep_recv = recv;	/* only forward: live reports hold a byte back */
	}
	if (segs_out > c->rep_segs_out)
		__sync_fetch_and_add(&v->segs_sent, segs_out - c->rep_segs_out);
	if (segs_in > c->rep_segs_in)
		__sync_fetch_and_add(&v->segs_recv, segs_in - c->rep_segs_in);
	c->rep_sent = sent;
	c->rep_segs_out = segs_out;
	c->rep_segs_in = segs_in;
}

#define RCV_SHUTDOWN 1

/* Payload received: bytes_received counts a received FIN's sequence number. */
static __always_inline __u64 payload_received(struct tcp_sock *tp)
{
	struct sock *sk = (struct sock *)tp;
	__u64 recv = BPF_CORE_READ(tp, bytes_received);
	__u8 shutdown = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_shutdown);

	return (shutdown & RCV_SHUTDOWN) && recv ? recv - 1 : recv;
}

/* The same while the connection lives, one byte behind: softirq bumps
 * bytes_received for a FIN before tcp_fin() sets RCV_SHUTDOWN, and a reader
 * on another CPU (the iterator, a recv on another socket) can land in
 * between. The close reports the exact count. */
static __always_inline __u64 payload_received_live(struct tcp_sock *tp)
{
	__u64 recv = payload_received(tp);
	__u64 raw = BPF_CORE_READ(tp, bytes_received);

	return recv < raw ? recv : (recv ? recv - 1 : 0);
}

static __always_inline __u64 payload_sent(struct tcp_sock *tp)
{
	return BPF_CORE_READ(tp, bytes_sent) - BPF_CORE_READ(tp, bytes_retrans);
}

static __always_inline __u32 sk_netns(struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline void owner_of_current(struct flow_key *key)
{
	key->tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(&key->comm, sizeof(key->comm));
}

/* A new socket took the address of one still tracked: the old one is gone,
 * and its close ran no program (under load the kernel skips a few runs of
 * these programs without counting a recursion miss; see README,
 * otelbpf.tcp.events_unseen). Count its end with what it last reported.
 * A passive open over a connect that never completed is the same socket
 * (simultaneous open, or a connect to its own port): nothing ended. */
static __always_inline void finish_unseen(struct conn_info *old, bool passive)
{
	struct flow_key fk;
	struct flow_val *v;

	if (passive && !old->established)
		return;
	otb_count(&flow_counters, FLOW_STAT_CLOSE_UNSEEN);
	fk = old->key;
	if (!old->established)
		fk.err = -1;	/* how it failed is unknown */
	v = flow_get(&fk);
	if (v)
		__sync_fetch_and_add(old->established ? &v->closed : &v->failed, 1);
}

/* Start tracking a connection at its socket address. The usual case costs
 * one insert; only an address still held by an old entry looks at it. */
static __always_inline bool track_conn(__u64 sk, struct conn_info *ci, bool passive)
{
	struct conn_info *old;

	if (!bpf_map_update_elem(&flow_conns, &sk, ci, BPF_NOEXIST))
		return true;
	old = bpf_map_lookup_elem(&flow_conns, &sk);
	if (old)
		finish_unseen(old, passive);
	if (!bpf_map_update_elem(&flow_conns, &sk, ci, BPF_ANY))
		return true;
	otb_count(&flow_counters, FLOW_STAT_CONN_TABLE_FULL);
	return false;
}

/* A connection ends: failed connect (keyed by its error) or close with its
 * final counters. */
static __always_inline void finish_conn(__u64 sk, struct conn_info *c, struct tcp_sock *tp)
{
	int sk_err = BPF_CORE_READ(&tp->inet_conn.icsk_inet.sk, sk_err);
	struct flow_val *v;

	if (!c->established) {
		struct flow_key fk = c->key;

		fk.err = sk_err;
		v = flow_get(&fk);
		if (v)
			__sync_fetch_and_add(&v->failed, 1);
	} else {
		v = flow_get(&c->key);
		if (v) {
			report(c, v, payload_sent(tp), payload_received(tp), BPF_CORE_READ(tp, segs_out),
			       BPF_CORE_READ(tp, segs_in), BPF_CORE_READ(tp, total_retrans));
			add_rtt(v, BPF_CORE_READ(tp, srtt_us) >> SRTT_SHIFT);
			__sync_fetch_and_add(&v->closed, 1);
			if (sk_err == ECONNRESET)
				__sync_fetch_and_add(&v->resets, 1);
		}
	}
	bpf_map_delete_elem(&flow_conns, &sk);
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(flow_state, struct sock *sk_ptr, int oldstate, int newstate)
{
	__u64 sk = (__u64)sk_ptr;
	struct listener_key lkey = {};
	struct conn_info *c;
	struct flow_val *v;
	__u16 family, sport, dport;
	__u8 v4[4], v6[16];

	if (BPF_CORE_READ_BITFIELD_PROBED(sk_ptr, sk_protocol) != IPPROTO_TCP)
		return 0;
	family = BPF_CORE_READ(sk_ptr, __sk_common.skc_family);
	sport = BPF_CORE_READ(sk_ptr, __sk_common.skc_num);
	dport = bpf_ntohs(BPF_CORE_READ(sk_ptr, __sk_common.skc_dport));
	BPF_CORE_READ_INTO(&v4, sk_ptr, __sk_common.skc_daddr);
	BPF_CORE_READ_INTO(&v6, sk_ptr, __sk_common.skc_v6_daddr.in6_u.u6_addr8);

	if (newstate == TCP_LISTEN || oldstate == TCP_LISTEN || (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV)) {
		lkey.netns = sk_netns(sk_ptr);
		lkey.port = sport;
	}
	if (newstate == TCP_LISTEN) {
		struct owner o = {};

		o.tgid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(&o.comm, sizeof(o.comm));
		bpf_map_update_elem(&flow_listeners, &lkey, &o, BPF_ANY);
		return 0;
	}
	if (oldstate == TCP_LISTEN && newstate == TCP_CLOSE) {
		bpf_map_delete_elem(&flow_listeners, &lkey);
		return 0;
	}

	if (newstate == TCP_SYN_SENT) {
		/* connect(): runs in the connecting process, the owner */
		struct conn_info ci = {};

		owner_of_current(&ci.key);
		ci.key.role = ROLE_CLIENT;
		ci.key.port = dport;
		set_peer(&ci.key, family, v4, v6);
		ci.start_ns = bpf_ktime_get_ns();
		ci.netns = sk_netns(sk_ptr);
		ci.seen_gen = iter_gen;
		track_conn(sk, &ci, false);
		return 0;
	}

	if (newstate == TCP_ESTABLISHED) {
		if (oldstate == TCP_SYN_RECV) {
			/* passive open, in softirq: the owner is the listener's */
			struct conn_info ci = {};
			struct owner *o = bpf_map_lookup_elem(&flow_listeners, &lkey);

			if (o) {
				ci.key.tgid = o->tgid;
				__builtin_memcpy(ci.key.comm, o->comm, sizeof(ci.key.comm));
			}
			ci.key.role = ROLE_SERVER;
			ci.key.port = sport;
			set_peer(&ci.key, family, v4, v6);
			ci.start_ns = bpf_ktime_get_ns();
			ci.established = 1;
			ci.netns = lkey.netns;
			ci.seen_gen = iter_gen;
			if (!track_conn(sk, &ci, true))
				return 0;
			v = flow_get(&ci.key);
			if (v)
				__sync_fetch_and_add(&v->opened, 1);
			return 0;
		}
		c = bpf_map_lookup_elem(&flow_conns, &sk);
		if (!c)
			return 0;
		c->established = 1;
		v = flow_get(&c->key);
		if (v)
			__sync_fetch_and_add(&v->opened, 1);
		return 0;
	}

	if (newstate != TCP_CLOSE)
		return 0;
	c = bpf_map_lookup_elem(&flow_conns, &sk);
	if (!c) {
		otb_count(&flow_counters, FLOW_STAT_CLOSE_UNTRACKED);
		return 0;
	}
	finish_conn(sk, c, (struct tcp_sock *)sk_ptr);
	return 0;
}

/* Safety net: a socket destroyed while still tracked (it never passed
 * through TCP_CLOSE where we could see it) is finished here. */
SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(flow_destroy, struct sock *sk_ptr)
{
	__u64 sk = (__u64)sk_ptr;
	struct conn_info *c = bpf_map_lookup_elem(&flow_conns, &sk);

	if (!c)
		return 0;
	otb_count(&flow_counters, FLOW_STAT_CLOSED_AT_DESTROY);
	finish_conn(sk, c, (struct tcp_sock *)sk_ptr);
	return 0;
}

static __always_inline int report_live(struct sock *sk_ptr)
{
	__u64 sk = (__u64)sk_ptr, now;
	struct tcp_sock *tp = (struct tcp_sock *)sk_ptr;
	struct conn_info *c;
	struct flow_val *v;

	/* any protocol reaches here; only TCP sockets are in flow_conns */
	c = bpf_map_lookup_elem(&flow_conns, &sk);
	if (!c || !c->established)
		return 0;
	now = bpf_ktime_get_ns();
	if (now - c->last_report_ns < report_ns)
		return 0;
	c->last_report_ns = now;
	v = flow_get(&c->key);
	if (!v)
		return 0;
	report(c, v, payload_sent(tp), payload_received_live(tp), BPF_CORE_READ(tp, segs_out),
	       BPF_CORE_READ(tp, segs_in), BPF_CORE_READ(tp, total_retrans));
	add_rtt(v, BPF_CORE_READ(tp, srtt_us) >> SRTT_SHIFT);
	return 0;
}

SEC("raw_tp/sock_send_length")
int BPF_PROG(flow_send, struct sock *sk_ptr)
{
	return report_live(sk_ptr);
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(flow_recv, struct sock *sk_ptr)
{
	return report_live(sk_ptr);
}

/* Run by user space each interval: live counters of every tracked
 * connection; connections that predate the agent are adopted, counting from
 * now (their owner is unknown: tgid 0). */
SEC("iter/tcp")
int flow_iter(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct conn_info *c;
	struct flow_val *v;
	__u64 sk;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	sk = (__u64)tp;
	c = bpf_map_lookup_elem(&flow_conns, &sk);
	if (c) {
		c->seen_gen = iter_gen;	/* alive, whatever its state */
		__u8 st = skc->skc_state;

		if (!c->established && st != TCP_SYN_SENT && st != TCP_SYN_RECV && st != TCP_CLOSE) {
			/* past the handshake, but its ESTABLISHED ran no program */
			c->established = 1;
			otb_count(&flow_counters, FLOW_STAT_OPEN_UNSEEN);
			v = flow_get(&c->key);
			if (v)
				__sync_fetch_and_add(&v->opened, 1);
		}
	}
	if (skc->skc_state != TCP_ESTABLISHED)
		return 0;
	if (!c) {
		struct conn_info ci = {};
		struct listener_key lk = {};
		__u8 v4[4];

		lk.netns = skc->skc_net.net->ns.inum;
		lk.port = skc->skc_num;
		ci.key.role = bpf_map_lookup_elem(&flow_listeners, &lk) ? ROLE_SERVER : ROLE_CLIENT;
		ci.key.port = ci.key.role == ROLE_SERVER ? lk.port : bpf_ntohs(skc->skc_dport);
		__builtin_memcpy(v4, &skc->skc_daddr, 4);
		set_peer(&ci.key, skc->skc_family, v4, skc->skc_v6_daddr.in6_u.u6_addr8);
		ci.established = 1;
		ci.netns = lk.netns;
		ci.seen_gen = iter_gen;
		ci.rep_sent = payload_sent(tp);
		ci.rep_recv = payload_received(tp);
		ci.rep_segs_out = tp->segs_out;
		ci.rep_segs_in = tp->segs_in;
		ci.rep_retrans = tp->total_retrans;
		if (bpf_map_update_elem(&flow_conns, &sk, &ci, BPF_NOEXIST))
			otb_count(&flow_counters, FLOW_STAT_CONN_TABLE_FULL);
		return 0;
	}
	v = flow_get(&c->key);
	if (!v)
		return 0;
	report(c, v, payload_sent(tp), payload_received_live(tp), tp->segs_out, tp->segs_in, tp->total_retrans);
	add_rtt(v, tp->srtt_us >> SRTT_SHIFT);
	c->last_report_ns = bpf_ktime_get_ns();
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
