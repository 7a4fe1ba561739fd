// SPDX-License-Identifier: GPL-2.0
/* L7 tracing: one capture, a parser per protocol.
 *
 * This file is the shared capture: it sees every TCP read and write when it
 * returns, and TLS plaintext, and hands each to the parser of its
 * connection's protocol:
 *  - l7/conn.h: connection state, the call record (struct data_ev), counters;
 *  - l7/http1.h: HTTP/1.x, paired and timed in the kernel;
 *  - l7/http2.h: HTTP/2 and gRPC, framed in the kernel, decoded in user space.
 * A protocol is recognised by a connection's first bytes (on_data below). A
 * new protocol brings its own header and one line in on_data.
 *
 * Hooks (all stable): socket reads and writes when they return, from the
 * sock_send_length/sock_recv_length tracepoints (6.3+) or else sys_exit
 * (read/write, recvfrom/sendto, readv/writev, recvmsg/sendmsg, sendfile; see
 * "capture" below); inet_sock_set_state and tcp_destroy_sock for the end of
 * a connection; and uprobes on OpenSSL (its read/write functions, placed by
 * user space where the kernel emulates the instruction; SSL_do_handshake,
 * SSL_set_fd, SSL_free) for TLS plaintext.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_tracing.h>
#include "otb_stats.h"
#include "log2_hist.h"
#include "l7/conn.h"
#include "l7/http1.h"
#ifndef OTB_NO_BPF_LOOP
#define OTB_HTTP2 1	/* HTTP/2 needs bpf_loop (5.17+) */
#include "l7/http2.h"
#endif
/* An SSL_read/SSL_write call in flight, in its thread's slot. */
struct ssl_args {
	__u64 ssl;
	__u64 buf;
	__u64 len_ptr;		/* _ex: where the byte count is written */
	__u64 ts;
	__u64 sk;		/* the socket its syscalls used, once seen */
	__u32 tid;		/* the slot's owner; 0: free */
	__u8 dir;
};

/* Per-thread slots (tid & (SSL_SLOTS - 1)), not a hash: every socket read
 * and write asks whether its thread is inside an SSL call, and an array
 * lookup is inlined, with nothing inserted or freed per call. */
#define SSL_SLOTS 16384
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SSL_SLOTS);
	__type(key, __u32);
	__type(value, struct ssl_args);
} http_ssl_calls SEC(".maps");

static __always_inline struct ssl_args *ssl_slot(__u32 tid)
{
	__u32 slot = tid & (SSL_SLOTS - 1);

	return bpf_map_lookup_elem(&http_ssl_calls, &slot);
}

/* An SSL object's address is only unique within its process: forked
 * workers (nginx) allocate theirs at the same addresses, and one worker's
 * SSL_free must not untie another's socket. */
struct ssl_key {
	__u32 tgid;
	__u32 pad;
	__u64 ssl;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, __u64);	/* struct sock * */
} http_ssl_socks SEC(".maps");

static __always_inline struct ssl_key ssl_key_of(__u32 tgid, __u64 ssl)
{
	struct ssl_key k = { .tgid = tgid, .ssl = ssl };

	return k;
}


/* ------------------------------------------------------------ dispatch */

/* The first 8 bytes of what a call moved (of its first buffer), into e: how
 * every parser tells whether a connection it does not know starts here.
 * Not inlined: its iovec stays out of the hooks' frames. */
static __noinline void read_head8(struct data_ev *e)
{
	__u64 base = e->src.buf, seg = e->len;

	e->head_ok = 0;
	if (e->nodata)
		return;
	if (e->src.vec) {
		struct iovec iov;

		if (!e->src.iovcnt || bpf_probe_read_user(&iov, sizeof(iov), (void *)e->src.buf))
			return;
		base = (__u64)iov.iov_base;
		seg = iov.iov_len < seg ? iov.iov_len : seg;
	}
	if (seg < 8 || bpf_probe_read_user(&e->head8, sizeof(e->head8), (void *)base))
		return;
	e->head_ok = 1;
}

/* HTTP/1's parser in a frame of its own. Each parser's chain of calls (the
 * hook, this, its global functions, a bpf_loop callback) must fit in 512
 * bytes of stack, which 6.1's and 6.12's verifiers count strictly: so the
 * dispatch is inlined into the hooks, and no parser's frame is on another's
 * chain. */
static __noinline void on_http1(struct data_ev *e, struct http_conn *c)
{
	http1_on_data(e, c);
}

/* A read or write of plaintext: to its connection's parser, or, on a
 * connection not tracked yet, to the first parser that recognises it. */
static __always_inline void on_data(struct data_ev *e)
{
	__u64 sk = e->sk;
	struct http_conn *c = bpf_map_lookup_elem(&http_conns, &sk);

	if (!c)
		read_head8(e);
#ifdef OTB_HTTP2
	if (c && c->proto == L7_HTTP2) {
		http2_on_data(e, c);
		return;
	}
	if (!c) {
		int started = http2_start(e);

		if (started == H2_START_WALK && (c = bpf_map_lookup_elem(&http_conns, &sk)))
			http2_on_data(e, c);
		if (started)
			return;
	}
#endif
	on_http1(e, c);
}


/* ------------------------------------------------------------- capture */

/* Reads and writes are seen when they return, by one of two paths chosen
 * at load (user space sets the other's programs not to load):
 *  - 6.3+: the sock:sock_send_length/sock_recv_length tracepoints, which
 *    fire once per socket send or receive, after it completed, with the
 *    struct sock and the byte count. No program runs for the host's other
 *    syscalls, and no fd table walk finds the socket.
 *  - before: sys_exit, for every syscall; the socket comes from the fd.
 * Either way the call's buffer comes from its syscall's saved registers,
 * which the kernel keeps untouched until the return to user space: there is
 * no program on sys_enter, and nothing kept per thread in between. One
 * thing is lost with the enter hook: the time a write started, so a client
 * request starts when the write that sent it returned (microseconds later
 * on loopback). */

static __always_inline bool skip_self(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == self_tgid;
}

/* A process the user asked us to leave alone (a load generator, a health
 * checker), by thread name. */
static __always_inline bool excluded(void)
{
	__u64 comm[2] = {};

	if (!n_excluded)
		return false;
	bpf_get_current_comm(comm, sizeof(comm));
#pragma unroll
	for (int i = 0; i < MAX_EXCLUDED; i++) {
		if (i < n_excluded && comm[0] == excluded_comm[i][0] && comm[1] == excluded_comm[i][1])
			return true;
	}
	return false;
}

/* Syscall numbers of this architecture, set by user space from its tables;
 * -1 never matches. */
const volatile long nr_read = -1, nr_write = -1, nr_recvfrom = -1, nr_sendto = -1, nr_readv = -1,
	nr_writev = -1, nr_recvmsg = -1, nr_sendmsg = -1, nr_sendfile = -1;

#if defined(__TARGET_ARCH_x86)
#define SYSCALL_NR(regs) ((regs)->orig_ax)
#elif defined(__TARGET_ARCH_arm64)
#define SYSCALL_NR(regs) ((regs)->syscallno)
#endif

/* Where the bytes of syscall nr are, from its registers, and their
 * direction; DIR_NONE when it is not a read or write of ours. sendfile has
 * no user buffer: its bytes are counted only (nodata). */
static __always_inline __u8 syscall_io(struct pt_regs *regs, long nr, struct io_src *src, __u8 *nodata)
{
	__u8 dir;

	src->buf = PT_REGS_PARM2_SYSCALL(regs);
	src->iovcnt = 0;
	src->vec = 0;
	*nodata = 0;
	if (nr == nr_read || nr == nr_recvfrom)
		return DIR_IN;
	if (nr == nr_write || nr == nr_sendto)
		return DIR_OUT;
	if (nr == nr_readv || nr == nr_writev) {
		src->iovcnt = PT_REGS_PARM3_SYSCALL(regs);
		src->vec = 1;
		return nr == nr_readv ? DIR_IN : DIR_OUT;
	}
	if (nr == nr_recvmsg || nr == nr_sendmsg) {
		struct user_msghdr msg;

		dir = nr == nr_recvmsg ? DIR_IN : DIR_OUT;
		/* the iovec array is in the user's msghdr */
		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)src->buf)) {
			src->buf = 0;
			*nodata = 1;
			return dir;
		}
		src->buf = (__u64)msg.msg_iov;
		src->iovcnt = msg.msg_iovlen;
		src->vec = 1;
		return dir;
	}
	src->buf = 0;
	*nodata = 1;
	return nr == nr_sendfile ? DIR_OUT : DIR_NONE;
}

/* Whether the current thread is inside an SSL_read/SSL_write, so that what
 * it moves on socket sk is ciphertext: that only teaches which socket the
 * SSL object uses. */
static __always_inline bool tls_ciphertext(__u64 sk, __u32 tid)
{
	struct ssl_args *ssl = ssl_slot(tid);

	if (!ssl || ssl->tid != tid)
		return false;
	if (ssl->sk != sk) {
		struct ssl_key k = ssl_key_of(bpf_get_current_pid_tgid() >> 32, ssl->ssl);

		ssl->sk = sk;
		bpf_map_update_elem(&http_ssl_socks, &k, &sk, BPF_ANY);
	}
	return true;
}

/* len bytes of plaintext moved on socket sk, in e->src: looked at as HTTP */
static __always_inline int capture(struct data_ev *e, __u64 sk, long len, __u8 dir)
{
	e->sk = sk;
	e->len = len;
	e->t1 = bpf_ktime_get_ns();
	e->t0 = e->t1;
	e->dir = dir;
	e->tls = 0;
	on_data(e);
	return 0;
}

/* One typed raw tracepoint for every syscall (kernels before 6.3): the
 * syscalls that are not socket I/O leave after a few compares. */
SEC("tp_btf/sys_exit")
int BPF_PROG(http_sys_exit, struct pt_regs *regs, long ret)
{
	long nr = SYSCALL_NR(regs);
	struct data_ev *e;
	__u64 id, sk;
	__u8 dir;

	if (nr != nr_read && nr != nr_write && nr != nr_recvfrom && nr != nr_sendto && nr != nr_readv &&
	    nr != nr_writev && nr != nr_recvmsg && nr != nr_sendmsg && nr != nr_sendfile)
		return 0;
	if (ret <= 0)
		return 0;
	id = bpf_get_current_pid_tgid();
	if ((id >> 32) == self_tgid || excluded())
		return 0;
	sk = tcp_sock_of_fd(PT_REGS_PARM1_SYSCALL(regs));
	if (!sk || tls_ciphertext(sk, (__u32)id))
		return 0;
	e = data_ev_slot();
	if (!e)
		return 0;
	dir = syscall_io(regs, nr, &e->src, &e->nodata);
	if (dir == DIR_NONE)
		return 0;
	return capture(e, sk, ret, dir);
}

#ifndef OTB_NO_RDONLY_CAST
#define PF_IO_WORKER 0x00000010
#define PF_KTHREAD 0x00200000
#define MSG_PEEK 2

static __always_inline int sock_io(struct sock *sk, int ret, int flags, __u8 dir)
{
	struct task_struct *task;
	struct pt_regs *regs;
	struct data_ev *e;
	__u64 id;

	/* cheapest tests first: most socket calls of a host are not TCP
	 * payload (unix sockets, UDP, EAGAIN) */
	if (ret <= 0 || sk->sk_protocol != IPPROTO_TCP || sk->sk_type != SOCK_STREAM)
		return 0;
	if (dir == DIR_IN && (flags & MSG_PEEK))
		return 0;	/* the same bytes are read again */
	id = bpf_get_current_pid_tgid();
	if ((id >> 32) == self_tgid || excluded() || tls_ciphertext((__u64)sk, (__u32)id))
		return 0;
	task = bpf_get_current_task_btf();
	if (task->flags & (PF_KTHREAD | PF_IO_WORKER))
		return 0;	/* no user syscall behind this socket call */
	e = data_ev_slot();
	if (!e)
		return 0;
	/* a call we do not know the buffer of (splice, sendmmsg, io_uring
	 * inline): its bytes still count towards a body */
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (syscall_io(regs, SYSCALL_NR(regs), &e->src, &e->nodata) == DIR_NONE) {
		e->src.buf = 0;
		e->nodata = 1;
	}
	return capture(e, (__u64)sk, ret, dir);
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(http_sock_send, struct sock *sk, int ret, int flags)
{
	return sock_io(sk, ret, flags, DIR_OUT);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(http_sock_recv, struct sock *sk, int ret, int flags)
{
	return sock_io(sk, ret, flags, DIR_IN);
}
#endif

/* ------------------------------------------------------- connection ends */

/* The connection ends: its parser closes what is open, and its state goes,
 * so a struct sock reused for a new connection starts clean. */
static __always_inline void conn_gone(__u64 sk)
{
	struct http_conn *c = bpf_map_lookup_elem(&http_conns, &sk);

	if (!c)
		return;
#ifdef OTB_HTTP2
	if (c->proto == L7_HTTP2)
		http2_conn_gone(sk, c);
	else
#endif
		http1_conn_gone(sk, c);
	bpf_map_delete_elem(&http_conns, &sk);
}

/* TCP_CLOSE: the process closed it, exited, or the socket was reset. The
 * freed sock's address is soon reused by another connection. */
SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(http_sock_state, struct sock *sk, int oldstate, int newstate)
{
	__u64 key = (__u64)sk;
	struct http_conn *c;

	if (newstate != 7 /* TCP_CLOSE */)
		return 0;
	c = bpf_map_lookup_elem(&http_conns, &key);
	if (!c)
		return 0;
	/* A peer that resets while the server holds a request: the server's
	 * write may still succeed, and that answer counts. Keep the state,
	 * marked; the answer, a reused sock or the sock's destruction clears
	 * it. */
	if (c->state == ST_REQUEST && c->role == ROLE_SERVER) {
		c->closed = 1;
		return 0;
	}
	/* HTTP/2 multiplexes: a reset can race a response being written on
	 * another stream, which then still counts. Its state goes with the
	 * sock (tcp_destroy_sock), before the address can be reused. */
	if (c->proto == L7_HTTP2)
		return 0;
	conn_gone(key);
	return 0;
}

/* The sock is freed: whatever state it still has (a server's request whose
 * peer left, and that was never answered) goes, counted. */
SEC("raw_tp/tcp_destroy_sock")
int BPF_PROG(http_sock_destroy, struct sock *sk)
{
	__u64 key = (__u64)sk;

	if (bpf_map_lookup_elem(&http_conns, &key))
		conn_gone(key);
	return 0;
}

/* ---------------------------------------------------------------- TLS */

static __always_inline int ssl_enter(__u64 ssl, __u64 buf, __u64 len_ptr, __u8 dir)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;
	struct ssl_args *a;
	__u64 *sk;

	if ((id >> 32) == self_tgid || !tid || excluded())
		return 0;
	a = ssl_slot(tid);
	if (!a)
		return 0;
	if (a->tid && a->tid != tid)
		otb_count(&http_stats, HS_TLS_SLOT_COLLISION);
	struct ssl_key k = ssl_key_of(id >> 32, ssl);	/* id is at hand: no second helper call */

	a->ssl = ssl;
	a->buf = buf;
	a->len_ptr = len_ptr;
	a->dir = dir;
	/* a write's start is a client request's first byte; what a read
	 * returns is seen at its return, which reads the clock then */
	a->ts = dir == DIR_OUT ? bpf_ktime_get_ns() : 0;
	sk = bpf_map_lookup_elem(&http_ssl_socks, &k);
	a->sk = sk ? *sk : 0;
	a->tid = tid;
	return 0;
}

static __always_inline int ssl_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct ssl_args *a = ssl_slot(tid);
	struct io_src src = {};
	__u64 len = ret, sk, t0;
	__u8 dir;

	if (!a || a->tid != tid || !tid)
		return 0;
	if (a->len_ptr) {
		/* _ex (1 on success) or the internal function SSL_read/SSL_read_ex
		 * both call, where user space may put the probes (> 0 on success):
		 * the count in *len_ptr */
		size_t done = 0;

		if (ret <= 0 || bpf_probe_read_user(&done, sizeof(done), (void *)a->len_ptr))
			done = 0;
		len = done;
	} else if (ret <= 0) {
		len = 0;
	}
	src.buf = a->buf;
	sk = a->sk;
	t0 = a->ts;
	dir = a->dir;
	a->tid = 0;
	if (!len || dir == DIR_NONE)
		return 0;
	if (!sk) {
		otb_count(&http_stats, HS_TLS_NO_SOCKET);
		return 0;
	}
	struct data_ev *e = data_ev_slot();

	if (!e)
		return 0;
	e->sk = sk;
	e->src = src;
	e->len = len;
	e->t0 = t0;
	e->t1 = bpf_ktime_get_ns();
	e->dir = dir;
	e->tls = 1;
	e->nodata = 0;
	on_data(e);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(http_ssl_read, void *ssl, void *buf, int num) { return ssl_enter((__u64)ssl, (__u64)buf, 0, DIR_IN); }
SEC("uretprobe")
int BPF_KRETPROBE(http_ssl_read_ret, int ret) { return ssl_exit(ret); }
SEC("uprobe")
int BPF_KPROBE(http_ssl_read_ex, void *ssl, void *buf, size_t num, size_t *readbytes)
{
	return ssl_enter((__u64)ssl, (__u64)buf, (__u64)readbytes, DIR_IN);
}
SEC("uretprobe")
int BPF_KRETPROBE(http_ssl_read_ex_ret, int ret) { return ssl_exit(ret); }
SEC("uprobe")
int BPF_KPROBE(http_ssl_write, void *ssl, const void *buf, int num) { return ssl_enter((__u64)ssl, (__u64)buf, 0, DIR_OUT); }
SEC("uretprobe")
int BPF_KRETPROBE(http_ssl_write_ret, int ret) { return ssl_exit(ret); }
SEC("uprobe")
int BPF_KPROBE(http_ssl_write_ex, void *ssl, const void *buf, size_t num, size_t *written)
{
	return ssl_enter((__u64)ssl, (__u64)buf, (__u64)written, DIR_OUT);
}
SEC("uretprobe")
int BPF_KRETPROBE(http_ssl_write_ex_ret, int ret) { return ssl_exit(ret); }

/* The handshake's own reads and writes tie the SSL object to its socket
 * before any SSL_read: with TLS 1.3 the first request often arrives with the
 * client's Finished message, and SSL_read then returns it without a syscall. */
SEC("uprobe")
int BPF_KPROBE(http_ssl_handshake, void *ssl) { return ssl_enter((__u64)ssl, 0, 0, DIR_NONE); }
SEC("uretprobe")
int BPF_KRETPROBE(http_ssl_handshake_ret, int ret) { return ssl_exit(ret); }

/* SSL_set_fd ties an SSL object to its socket up front (nginx, curl, wrk);
 * SSL_free unties it, so a new connection's SSL object at a reused address
 * never inherits the old socket. */
SEC("uprobe")
int BPF_KPROBE(http_ssl_set_fd, void *ssl, int fd)
{
	struct ssl_key key = ssl_key_of(bpf_get_current_pid_tgid() >> 32, (__u64)ssl);
	__u64 sk;

	if (skip_self() || fd < 0)
		return 0;
	sk = tcp_sock_of_fd(fd);
	if (sk)
		bpf_map_update_elem(&http_ssl_socks, &key, &sk, BPF_ANY);
	else
		bpf_map_delete_elem(&http_ssl_socks, &key);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(http_ssl_free, void *ssl)
{
	struct ssl_key key = ssl_key_of(bpf_get_current_pid_tgid() >> 32, (__u64)ssl);

	bpf_map_delete_elem(&http_ssl_socks, &key);
	return 0;
}

/* Does nothing: user space times a few hits of it on its own process to
 * learn what a uprobe costs on this machine (a VM can make it 10x dearer). */
SEC("uprobe")
int BPF_KPROBE(http_uprobe_calibrate) { return 0; }

char LICENSE[] SEC("license") = "GPL";
