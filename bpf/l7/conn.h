/* SPDX-License-Identifier: GPL-2.0 */
/* The shared L7 capture's state: what every protocol parser sees.
 *
 * A TCP connection is keyed by its struct sock's address (http_conns); its
 * tuple, owner (tgid, comm) and protocol are here, and each parser keeps its
 * own transaction state beside it. A read or write reaches a parser as a
 * struct data_ev (the socket, where the bytes are, how many, when, which
 * way, plaintext from TLS or not), from one of the capture hooks in
 * http.bpf.c. Drop and overflow counters of every protocol share one enum.
 */
#ifndef OTB_L7_CONN_H
#define OTB_L7_CONN_H

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOCK_STREAM 1
#define S_IFMT 00170000
#define S_IFSOCK 0140000

#define SCRATCH 4096		/* most payload bytes parsed per read/write (power of two) */
#define SCRATCH_MASK (SCRATCH - 1)
#define MAX_IOV 8		/* iovecs looked at to find the end of a vector write */
#define NS_PER_S 1000000000ULL	/* bpf_ktime_get_ns() ticks in a second */

enum io_dir { DIR_IN = 0, DIR_OUT = 1, DIR_NONE = 2 };
enum http_role { ROLE_NONE = 0, ROLE_SERVER = 1, ROLE_CLIENT = 2 };

/* The protocol a connection was recognised as (by its first bytes). */
enum l7_proto { L7_HTTP1 = 0, L7_HTTP2 = 1 };

enum http_stat {
	HS_CONN_TABLE_FULL = 0,	/* a connection could not be tracked */
	HS_AGG_FULL,		/* metrics map full: counted in the overflow series */
	HS_SAMPLED_OUT,		/* spans not sampled (ratio or parent's flag) */
	HS_RATE_LIMITED,	/* spans over max_spans_per_second */
	HS_RINGBUF_FULL,	/* spans lost: user space too slow */
	HS_NO_RESPONSE,		/* connection closed while a request waited for its response */
	HS_UNPAIRED_RESPONSE,	/* a response with no request in flight (pipelining, or older than us) */
	HS_TLS_NO_SOCKET,	/* TLS plaintext whose socket was never seen */
	HS_DETAIL_FULL,		/* a sampled request's details could not be kept */
	HS_DETAIL_LOST,		/* ...or were gone when it ended (evicted, or another request's) */
	HS_TLS_SLOT_COLLISION,	/* two threads in SSL calls shared a slot: the older call is lost */
	HS_THREAD_SLOT_COLLISION,	/* two threads serving requests shared a thread_request slot */
	HS_H2_RINGBUF_FULL,	/* HTTP/2 frames lost: user space too slow */
	HS_H2_BLOCK_CUT,	/* an HTTP/2 header block longer than the kernel sends */
	HS_H2_RESYNC,		/* bytes of an HTTP/2 connection missed: its frames were found again */
	HS_H2_STATE_LOST,	/* an HTTP/2 connection's frame state was evicted (too many connections) */
	HS_MAX,
};

/* Set by user space before load. */
const volatile __u32 self_tgid = 0;
#define MAX_EXCLUDED 4
const volatile __u64 excluded_comm[MAX_EXCLUDED][2] = {};	/* thread names not traced (zero-padded) */
const volatile __u8 n_excluded = 0;

struct conn_tuple {
	__u8 laddr[16];
	__u8 raddr[16];
	__u16 lport;
	__u16 rport;
	__u8 family;
	__u8 pad[3];
};

struct http_conn {
	struct conn_tuple t;
	__u64 req_start_ns;
	__u64 resp_end_ns;
	__u64 last_ns;
	__s64 body_left;
	__u64 path_hash;
	__u32 tgid;
	__u16 status;
	__u8 role;
	__u8 state;
	__u8 method;
	__u8 body;
	__u8 tls;
	__u8 sampled;
	__u8 closed;		/* TCP closed while a request was open: the process may still answer */
	__u8 path_known;	/* path_hash is in http_paths (as far as this connection knows) */
	char comm[16];		/* tgid's thread name: a request may end in another task's context */
	__u8 proto;		/* enum l7_proto */
	__u8 pad2[3];
	__u32 tid;		/* server: the thread that read the request (its thread_request slot) */
};


struct scratch {
	char buf[SCRATCH + 512];	/* slack so fixed-size copies at a masked offset stay inside */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);	/* struct sock * */
	__type(value, struct http_conn);
} http_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} http_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_conn);
} http_zero_conn SEC(".maps");	/* stays zero: a new connection's state */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} http_stats SEC(".maps");

/* ------------------------------------------------------------------ helpers */

/* One more event in a one-second window of at most cap (a span rate
 * limiter); false past the cap. Add, then read: an add that returns the old
 * value (BPF_ATOMIC_FETCH) needs 5.12, and a race here only blurs the cap
 * by a few. Once the cap is reached the counter is only read: an atomic
 * add on a line every CPU writes would move it between CPUs per request. */
static __always_inline bool l7_rate_allow(__u64 *window, __u64 *used, __u64 cap, __u64 now)
{
	__u64 w = now / NS_PER_S;

	if (*window != w) {
		*window = w;
		*used = 0;
	}
	if (*used >= cap)
		return false;
	__sync_fetch_and_add(used, 1);
	return *used <= cap;
}

static __always_inline __u32 hide(__u32 v)
{
	/* keep clang from merging the bound check into something the verifier
	 * cannot follow */
	asm volatile("" : "+r"(v));
	return v;
}

static __always_inline char lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* The 8 bytes at p, whose offset the caller made a multiple of 8, in one
 * load. Said so: from a char pointer clang assumes no alignment and splits
 * the load into 8 byte loads and 14 shifts and ors. */
#define LOAD_U64_ALIGNED(p) (*(const __u64 *)__builtin_assume_aligned((p), 8))

static __always_inline char sc(const struct scratch *s, __u32 i)
{
	return s->buf[i & SCRATCH_MASK];
}

/* The 8 bytes at p (or s[i]), any alignment, in one load (little-endian).
 * A C load from an unaligned char pointer is split by clang into 8 byte
 * loads; BPF's 8-byte load has no alignment requirement on the
 * architectures it is JITed for here (x86-64, arm64), and the verifier
 * allows it on a map value. */
static __always_inline __u64 load8_at(const void *p)
{
	__u64 w;

	asm volatile("%0 = *(u64 *)(%1 + 0)" : "=r"(w) : "r"(p));
	return w;
}

static __always_inline __u64 load8(const struct scratch *s, __u32 i)
{
	return load8_at(&s->buf[i & SCRATCH_MASK]);
}

/* Text as a little-endian word, to compare with load8()'s, and a mask of a
 * word's first n bytes. */
#define W(a, b, c, d, e, f, g, h)                                                                   \
	((__u64)(a) | (__u64)(b) << 8 | (__u64)(c) << 16 | (__u64)(d) << 24 | (__u64)(e) << 32 |  \
	 (__u64)(f) << 40 | (__u64)(g) << 48 | (__u64)(h) << 56)
#define MASK_BYTES(n) ((n) >= 8 ? ~0ULL : (1ULL << (8 * (n))) - 1)
/* whether word w starts with the n bytes of text word t */
#define STARTS(w, n, t) (((w) & MASK_BYTES(n)) == (t))

/* The socket behind fd in the current task, or 0 if fd is not a TCP socket.
 * Two builds of it (the Makefile's http variants), chosen at load time. */
#ifndef OTB_NO_RDONLY_CAST
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

static __always_inline __u64 tcp_sock_of_fd(__u32 fd)
{
	/* 6.2+: BTF pointer walks. The verifier turns each into an inlined,
	 * fault-safe load, several times cheaper than a bpf_probe_read_kernel
	 * call each, which matters on every read and write of the host */
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file *f = NULL;
	struct socket *sock;
	struct sock *sk;

	if (!fdt || fd >= fdt->max_fds)
		return 0;
	/* fdt->fd[fd]: a variable index, so one helper read */
	if (bpf_probe_read_kernel(&f, sizeof(f), &fdt->fd[fd]) || !f)
		return 0;
	f = bpf_rdonly_cast(f, bpf_core_type_id_kernel(struct file));
	if ((f->f_inode->i_mode & S_IFMT) != S_IFSOCK)
		return 0;
	sock = f->private_data;	/* a void *: cast to give it its type back */
	if (!sock)
		return 0;
	sock = bpf_rdonly_cast(sock, bpf_core_type_id_kernel(struct socket));
	sk = sock->sk;
	if (!sk || sk->sk_protocol != IPPROTO_TCP || sk->sk_type != SOCK_STREAM)
		return 0;
	/* the address as a plain number (a map key): read, not converted */
	__u64 addr = 0;

	bpf_probe_read_kernel(&addr, sizeof(addr), &sock->sk);
	return addr;
}
#else
static __always_inline __u64 tcp_sock_of_fd(__u32 fd)
{
	/* Kernels without the bpf_rdonly_cast kfunc (before 6.2) and, before
	 * 5.11, without bpf_get_current_task_btf: the same walk, CO-RE reads */
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds, *f = NULL;
	struct socket *sock;
	struct sock *sk;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return 0;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	sock = BPF_CORE_READ(f, private_data);
	if (!sock)
		return 0;
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP || BPF_CORE_READ(sk, sk_type) != SOCK_STREAM)
		return 0;
	return (__u64)sk;
}
#endif

static __always_inline void read_tuple(__u64 skp, struct conn_tuple *t)
{
	struct sock *sk = (struct sock *)skp;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	t->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	t->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&t->laddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&t->raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
		/* v4-mapped peers are IPv4 */
		t->family = (t->raddr[10] == 0xff && t->raddr[11] == 0xff &&
			     !(t->raddr[0] | t->raddr[1] | t->raddr[2] | t->raddr[3] |
			       t->raddr[4] | t->raddr[5] | t->raddr[6] | t->raddr[7] |
			       t->raddr[8] | t->raddr[9])) ? AF_INET : AF_INET6;
	} else {
		__u32 l = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 r = BPF_CORE_READ(sk, __sk_common.skc_daddr);

		t->family = AF_INET;
		t->laddr[10] = t->laddr[11] = 0xff;
		t->raddr[10] = t->raddr[11] = 0xff;
		__builtin_memcpy(&t->laddr[12], &l, 4);
		__builtin_memcpy(&t->raddr[12], &r, 4);
	}
}

/* Where a read/write's bytes are: one buffer or an iovec array. */
struct io_src {
	__u64 buf;
	__u32 iovcnt;
	__u8 vec;
};



/* Bytes moved on a socket, and the request they may start. Both live in a
 * per-CPU map value, not on the stack: the frames of sys_exit, on_data,
 * on_request and a bpf_loop callback must fit in 512 bytes together, which
 * 6.1's and 6.12's verifiers count strictly. */
struct data_ev {
	__u64 sk;
	struct io_src src;
	__u64 len;
	__u64 t0;		/* when the call started */
	__u64 t1;		/* when it returned */
	__u8 dir;
	__u8 tls;
	__u8 nodata;		/* sendfile: no user buffer to look at */
	__u8 head_ok;		/* head8 holds the message's first 8 bytes */
	__u64 head8;		/* read once, for every parser's "does this start a message?" */
};


struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct data_ev);
} http_data_ev SEC(".maps");

/* A data_ev to fill, or NULL (never: a one-entry array). */
static __always_inline struct data_ev *data_ev_slot(void)
{
	__u32 z = 0;

	return bpf_map_lookup_elem(&http_data_ev, &z);
}

#endif
