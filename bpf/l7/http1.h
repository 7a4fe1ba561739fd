/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/1.x: requests and responses paired and timed per connection.
 *
 * Per TCP socket a small state machine follows request -> response: the side
 * that sends the request is the client, the side that receives it the
 * server. A transaction starts at the first byte of the request (server: the
 * read that returned it; client: the write that sent it) and ends at the
 * last byte of the response, found from Content-Length, the chunked
 * terminator, HEAD/204/304 (no body), or failing those the next request or
 * the close.
 *
 * Every transaction is added to a duration histogram keyed by (process,
 * role, method, status, port, path hash): RED metrics counted in the kernel,
 * whatever the span sampling. Sampled transactions also go to user space as
 * one ring-buffer record holding the request line and three headers
 * (traceparent, user-agent, host). Nothing else of the payload leaves the
 * kernel: Authorization, Cookie and the rest are never copied out.
 */
#ifndef OTB_L7_HTTP1_H
#define OTB_L7_HTTP1_H

#include "l7/conn.h"
#include "l7/duration.h"
#include "thread_request.h"

#define PATH_CAP 256		/* path bytes a span record can hold */
#define UA_CAP 128
#define HOST_CAP 64
#define TP_LEN 55		/* "00-" 32 hex "-" 16 hex "-" 2 hex */

/* -DOTB_NO_BPF_LOOP: a build for kernels without bpf_loop (before 5.17) and
 * without pointer arguments to global functions (before 5.12), such as
 * Debian 11's 5.10. It parses the same bytes as the default build, with no
 * lower limit: request targets and headers are scanned up to SCRATCH bytes
 * (and n, the bytes copied), header values up to UA_CAP, by the same step
 * functions (path_step, header_word, value_byte).
 *
 * What changes is how the verifier sees the loops. A bpf_loop callback is
 * checked on its own; a plain bounded loop is walked once per iteration and
 * per state reaching it, and inside a loop the verifier keeps few states to
 * prune with, so each branch of the body multiplies the paths. Inlined, the
 * target loop took sys_exit past the 1M-instruction budget on 5.10 within
 * 128 bytes, and the header loop within a few dozen words. So here:
 *  - the target and header loops make one call per iteration, to a global
 *    function (path_chunk_g: 8 target bytes; header_word_g: one 8-byte
 *    word), which the verifier checks once and then takes as a black box.
 *    A global function takes scalars only before 5.12, so these work on a
 *    per-CPU copy of the loop's context (http_path_ctx, http_hdr_ctx),
 *    filled and read back around the loop. The price is paid at run time,
 *    per 8 bytes scanned: one call, 3 (target) or 2 (headers) per-CPU array
 *    lookups (helper calls on 5.10) and a 48-byte copy each way;
 *  - the three header value copies (at most UA_CAP steps) are plain bounded
 *    loops;
 *  - finish and on_request are static functions, walked once per call site.
 * The verifier processes ~63k instructions for sys_exit on Debian's 5.10 and
 * 6.1, ~176k on 6.12, ~280k on 6.18 (the default build: ~390k on 6.18). */
#ifdef OTB_NO_BPF_LOOP
#define OTB_VERIFY_ONCE static __noinline
#else
/* global: the verifier checks it once, not per caller */
#define OTB_VERIFY_ONCE __noinline
#endif

enum conn_state { ST_IDLE = 0, ST_REQUEST = 1, ST_RESPONSE = 2 };
enum body_mode { BODY_UNKNOWN = 0, BODY_NONE, BODY_LENGTH, BODY_CHUNKED };
enum http_method { M_OTHER = 0, M_GET, M_POST, M_PUT, M_DELETE, M_HEAD, M_PATCH, M_OPTIONS, M_CONNECT, M_TRACE };

const volatile __u32 head_bytes = 1024;		/* payload bytes parsed at a message start */
const volatile __u32 path_bytes = 128;		/* path bytes kept for spans and routes */
const volatile __u32 sample_threshold = 0xFFFFFFFF;	/* span kept if prandom <= this */
const volatile __u8 spans_enabled = 1;
const volatile __u8 parent_based = 1;		/* a traceparent's sampled flag decides */
const volatile __u8 capture_query = 0;
const volatile __u64 max_spans_per_second = 1000;
const volatile __u32 overflow_tgid = 0xFFFFFFFF;
const volatile __u32 ring_bytes = 4 << 20;	/* http_events' size */

/* The span rate limiter's window (shared by all CPUs; races only blur the cap). */
__u64 rl_window = 0;
__u64 rl_used = 0;

struct http_key {
	__u32 tgid;
	__u16 status;
	__u16 port;		/* server: local port; client: the server's port */
	__u8 role;
	__u8 method;
	__u8 tls;
	__u8 family;
	__u8 addr[16];		/* client: the server's address; server: zero (no per-client series) */
	__u32 pad;		/* explicit: a hash key must not hold uninitialised padding */
	__u64 path_hash;	/* FNV-1a of the path without query; the string is in http_paths */
};

struct http_hist {
	__u64 count;
	__u64 sum_ns;
	__u64 log2[OTB_LOG2_BUCKETS];	/* log2 of the duration in 2^-30 s units: OTLP scale 0 in seconds */
	__u64 sem[SEM_BUCKETS];
	char comm[16];
};

struct http_path {
	__u32 len;		/* bytes of path that are the path (a captured query follows) */
	char path[PATH_CAP];
};

struct http_event {
	__u64 start_ns;
	__u64 end_ns;
	__u32 tgid;
	__u32 tid;
	struct conn_tuple t;
	__u16 status;
	__u16 path_len;
	__u8 role;
	__u8 method;
	__u8 tls;
	__u8 flags;		/* bit 0: path truncated */
	char comm[16];
	__u32 route_len;	/* path bytes before any query: with path, a struct http_path */
	char path[PATH_CAP];
	char traceparent[TP_LEN + 1];
	char user_agent[UA_CAP];
	char host[HOST_CAP];
	__u8 trace_id[16];	/* the span's ids, chosen here: the profiler's samples carry them */
	__u8 pad2[12];
	__u64 span_id;
	__u64 cpu_samples;	/* CPU samples taken while its thread served it (server) */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);	/* struct sock * */
	__type(value, struct http_event);
} http_drafts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct http_key);
	__type(value, struct http_hist);
} http_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct http_path);
} http_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} http_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_event);
} http_zero_event SEC(".maps");	/* stays zero: the template a parse starts from */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_hist);
} http_zero_hist SEC(".maps");	/* zero counts (comm set per use): a new series' first value */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct http_event);
} http_parse SEC(".maps");	/* the request being parsed; copied to http_drafts if sampled */

enum head_kind { HEAD_REQUEST = 1, HEAD_RESPONSE = 2 };

/* Whether 8 bytes (little-endian) can start a request line ("GET /",
 * "POST /"...) or a status line ("HTTP/1."): the test that keeps bulk data
 * and other protocols from costing a head copy and a parse. */
static __always_inline bool head_plausible(__u64 w, __u8 kinds)
{
	__u32 lo = (__u32)w;

	if ((kinds & HEAD_RESPONSE) && (w & 0x00ffffffffffffffULL) == 0x002e312f50545448ULL)	/* "HTTP/1." */
		return true;
	if (!(kinds & HEAD_REQUEST))
		return false;
	return lo == 0x20544547 /* "GET " */ || lo == 0x54534f50 /* "POST" */ || lo == 0x20545550 /* "PUT " */ ||
	       lo == 0x44414548 /* "HEAD" */ || lo == 0x454c4544 /* "DELE" */ || lo == 0x43544150 /* "PATC" */ ||
	       lo == 0x4954504f /* "OPTI" */ || lo == 0x4e4e4f43 /* "CONN" */ || lo == 0x43415254 /* "TRAC" */;
}

/* Copy the first bytes of the message (from its first segment) into s;
 * returns how many. With kinds (on a connection not known to be HTTP), only
 * when its first 8 bytes (first, read by the caller) can start a message of
 * those kinds (0 if not). */
static __always_inline __u32 copy_head(struct scratch *s, const struct io_src *src, __u64 len, __u32 cap,
				       __u8 kinds, __u64 first)
{
	__u64 base = src->buf, seg = len;

	if (src->vec) {
		struct iovec iov;

		if (!src->iovcnt || bpf_probe_read_user(&iov, sizeof(iov), (void *)src->buf))
			return 0;
		base = (__u64)iov.iov_base;
		seg = iov.iov_len < len ? iov.iov_len : len;
	}
	if (seg > cap)
		seg = cap;
	/* 12 bytes at least: a status line's code, or a request line's
	 * method, a one-byte target and a version */
	if (seg < 12)
		return 0;
	if (kinds && !head_plausible(first, kinds))
		return 0;
	__u32 n = hide((__u32)seg);
	if (n > SCRATCH)
		n = SCRATCH;
	if (n == 0 || bpf_probe_read_user(s->buf, n, (void *)base))
		return 0;
	/* a NUL after the copy: comparisons running past n never match stale bytes */
	s->buf[n & SCRATCH_MASK] = 0;
	return n;
}

/* Whether the message's last 5 bytes are the chunked terminator "0\r\n\r\n". */
static __always_inline bool ends_chunked(const struct io_src *src, __u64 len)
{
	char tail[5] = {};
	__u64 end = src->buf + len;

	if (src->vec) {
		struct iovec iov;
		__u64 left = len;
		__u32 i;

		end = 0;
		for (i = 0; i < MAX_IOV; i++) {
			if (i >= src->iovcnt)
				break;
			if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(src->buf + i * sizeof(iov))))
				return false;
			if (iov.iov_len >= left) {
				if (left < 5)
					return false;
				end = (__u64)iov.iov_base + left;
				break;
			}
			left -= iov.iov_len;
		}
		if (!end)
			return false;
	} else if (len < 5) {
		return false;
	}
	if (bpf_probe_read_user(tail, 5, (void *)(end - 5)))
		return false;
	return tail[0] == '0' && tail[1] == '\r' && tail[2] == '\n' && tail[3] == '\r' && tail[4] == '\n';
}

/* The request method at the start of s, and the length of "METHOD ": one
 * load and a compare per method. */
static __always_inline __u8 parse_method(const struct scratch *s, __u32 n, __u32 *skip)
{
	__u64 w = LOAD_U64_ALIGNED(s->buf);

	if (n < 16)
		return 0xff;
	if (STARTS(w, 4, W('G', 'E', 'T', ' ', 0, 0, 0, 0))) { *skip = 4; return M_GET; }
	if (STARTS(w, 5, W('P', 'O', 'S', 'T', ' ', 0, 0, 0))) { *skip = 5; return M_POST; }
	if (STARTS(w, 4, W('P', 'U', 'T', ' ', 0, 0, 0, 0))) { *skip = 4; return M_PUT; }
	if (STARTS(w, 6, W('P', 'A', 'T', 'C', 'H', ' ', 0, 0))) { *skip = 6; return M_PATCH; }
	if (STARTS(w, 7, W('D', 'E', 'L', 'E', 'T', 'E', ' ', 0))) { *skip = 7; return M_DELETE; }
	if (STARTS(w, 5, W('H', 'E', 'A', 'D', ' ', 0, 0, 0))) { *skip = 5; return M_HEAD; }
	if (w == W('O', 'P', 'T', 'I', 'O', 'N', 'S', ' ')) { *skip = 8; return M_OPTIONS; }
	if (w == W('C', 'O', 'N', 'N', 'E', 'C', 'T', ' ')) { *skip = 8; return M_CONNECT; }
	if (STARTS(w, 6, W('T', 'R', 'A', 'C', 'E', ' ', 0, 0))) { *skip = 6; return M_TRACE; }
	return 0xff;
}

/* "HTTP/1.0 " or "HTTP/1.1 " at s[i] */
static __always_inline bool is_version(const struct scratch *s, __u32 i, char after)
{
	__u64 w = load8(s, i);

	return STARTS(w, 7, W('H', 'T', 'T', 'P', '/', '1', '.', 0)) && ((w >> 56) == '0' || (w >> 56) == '1') &&
	       sc(s, i + 8) == after;
}

/* ---------------------------------------------------------- request line */

struct path_ctx {
	struct scratch *s;
	struct http_event *ev;
	__u32 start, n, end;
	__u64 hash;
	__u8 in_query;
};

/* One byte of the request target: hashed up to the query, copied up to
 * path_bytes (the query only when capture_query), stopped at the space. */
static __always_inline long path_step(__u32 i, void *data)
{
	struct path_ctx *p = data;
	__u32 pos = p->start + i;
	char c;

	if (pos >= p->n)
		return 1;
	c = sc(p->s, pos);
	if (c == ' ' || c == '\r' || c == '\n') {
		p->end = pos;
		return 1;
	}
	if (!p->in_query && (c == '?' || c == '#')) {
		p->in_query = 1;
		p->ev->route_len = i < path_bytes ? i : path_bytes;
	}
	if (!p->in_query)
		p->hash = (p->hash ^ (__u8)c) * 0x100000001b3ULL;
	if (i < path_bytes && (!p->in_query || capture_query)) {
		__u32 k = hide(i);

		if (k < PATH_CAP) {
			p->ev->path[k] = c;
			p->ev->path_len = k + 1;
		}
	}
	return 0;
}

#define PATH_CHUNK 8	/* target bytes per loop step: one callback per 8 bytes, not per byte */

#ifdef OTB_NO_BPF_LOOP

/* Home of scan_path's context while path_chunk_g runs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	/* sizes, not types: given a struct that points to struct scratch,
	 * clang 14 emits scratch as a forward declaration, and http_scratch's
	 * value type with it, which libbpf rejects */
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct path_ctx));
} http_path_ctx SEC(".maps");

/* path_step over target bytes i * PATH_CHUNK and on: 1 when the target
 * ended. Global, on the per-CPU copy of the context: see OTB_NO_BPF_LOOP. */
__noinline int path_chunk_g(__u32 i)
{
	__u32 z = 0;
	struct path_ctx *g = bpf_map_lookup_elem(&http_path_ctx, &z);
	struct path_ctx p;
	int stop = 0;

	if (!g)
		return 1;
	p = *g;
	p.s = bpf_map_lookup_elem(&http_scratch, &z);
	p.ev = bpf_map_lookup_elem(&http_parse, &z);
	if (!p.s || !p.ev)
		return 1;
#pragma unroll
	for (__u32 j = 0; j < PATH_CHUNK; j++) {
		if (path_step(i * PATH_CHUNK + j, &p)) {
			stop = 1;
			break;
		}
	}
	p.s = NULL;
	p.ev = NULL;
	*g = p;
	return stop;
}
#endif

#ifndef OTB_NO_BPF_LOOP
/* bpf_loop's step: path_step over target bytes i * PATH_CHUNK and on */
static long path_chunk(__u32 i, void *data)
{
#pragma unroll
	for (__u32 j = 0; j < PATH_CHUNK; j++) {
		if (path_step(i * PATH_CHUNK + j, data))
			return 1;
	}
	return 0;
}
#endif

/* The request target: path_step over up to SCRATCH bytes. */
static __always_inline void scan_path(struct path_ctx *p)
{
#ifdef OTB_NO_BPF_LOOP
	__u32 z = 0;
	struct path_ctx *g = bpf_map_lookup_elem(&http_path_ctx, &z);
	struct scratch *s = p->s;
	struct http_event *ev = p->ev;

	if (!g)
		return;
	p->s = NULL;	/* map values hold no pointers */
	p->ev = NULL;
	*g = *p;
	for (__u32 i = 0; i < SCRATCH / PATH_CHUNK; i++)
		if (path_chunk_g(i))
			break;
	*p = *g;
	p->s = s;
	p->ev = ev;
#else
	bpf_loop(SCRATCH / PATH_CHUNK, path_chunk, p, 0);
#endif
}

/* ------------------------------------------------------------- headers */

enum hdr_want { H_TRACEPARENT = 1, H_USER_AGENT = 2, H_HOST = 4, H_LENGTH = 8, H_CHUNKED = 16 };
enum hdr_field { F_NONE = 0, F_TRACEPARENT, F_USER_AGENT, F_HOST };

struct hdr_ctx {
	struct scratch *s;
	__u32 n;
	__u32 end;		/* offset just past the blank line, 0 if not seen */
	__s64 content_length;	/* -1: none */
	__u32 value_at[4];	/* by enum hdr_field: where the value starts, 0 if absent */
	__u8 want;
	__u8 chunked;
};

/* load8() with ASCII letters lowercased: OR 0x20 maps 'A'-'Z' to 'a'-'z'
 * and leaves the digits, '-', ':' and ' ' of a header name as they are. */
static __always_inline __u64 lower8(const struct scratch *s, __u32 i)
{
	return load8(s, i) | 0x2020202020202020ULL;
}

static __always_inline __u32 skip_spaces(const struct scratch *s, __u32 i)
{
	if (sc(s, i) == ' ')
		i++;
	if (sc(s, i) == ' ')
		i++;
	return i;
}

/* A header line starts at q. Returns 1 to stop (blank line, or out of data).
 * A name is told by one or two word compares, not byte by byte: this runs
 * for every line of every response head (Content-Length). */
static __always_inline long header_line(struct hdr_ctx *h, __u32 q)
{
	struct scratch *s = h->s;
	__u64 w0;
	__u32 v;

	if (q + 1 >= h->n)
		return 1;
	if (sc(s, q) == '\r' && sc(s, q + 1) == '\n') {
		h->end = q + 2;
		return 1;
	}
	w0 = lower8(s, q);
	if (w0 == W('c', 'o', 'n', 't', 'e', 'n', 't', '-')) {
		if (!(h->want & H_LENGTH) || !STARTS(lower8(s, q + 8), 7, W('l', 'e', 'n', 'g', 't', 'h', ':', 0)))
			return 0;
		__s64 cl = 0;
		__u32 k;

		v = skip_spaces(s, q + 15);
#pragma unroll
		for (k = 0; k < 15; k++) {
			char c = sc(s, v + k);

			if (c < '0' || c > '9')
				break;
			cl = cl * 10 + (c - '0');
		}
		if (k > 0)
			h->content_length = cl;
	} else if (w0 == W('t', 'r', 'a', 'c', 'e', 'p', 'a', 'r')) {
		if ((h->want & H_TRACEPARENT) && STARTS(lower8(s, q + 8), 4, W('e', 'n', 't', ':', 0, 0, 0, 0)))
			h->value_at[F_TRACEPARENT] = skip_spaces(s, q + 12);
	} else if (w0 == W('t', 'r', 'a', 'n', 's', 'f', 'e', 'r')) {
		if ((h->want & H_CHUNKED) && lower8(s, q + 8) == W('-', 'e', 'n', 'c', 'o', 'd', 'i', 'n') &&
		    STARTS(lower8(s, q + 16), 2, W('g', ':', 0, 0, 0, 0, 0, 0))) {
			v = skip_spaces(s, q + 18);
			/* "chunked" is the last coding whenever it is present */
			if (lower(sc(s, v)) == 'c' && lower(sc(s, v + 1)) == 'h' && lower(sc(s, v + 6)) == 'd')
				h->chunked = 1;
		}
	} else if (w0 == W('u', 's', 'e', 'r', '-', 'a', 'g', 'e')) {
		if ((h->want & H_USER_AGENT) && STARTS(lower8(s, q + 8), 3, W('n', 't', ':', 0, 0, 0, 0, 0)))
			h->value_at[F_USER_AGENT] = skip_spaces(s, q + 11);
	} else if (STARTS(w0, 5, W('h', 'o', 's', 't', ':', 0, 0, 0))) {
		if (h->want & H_HOST)
			h->value_at[F_HOST] = skip_spaces(s, q + 5);
	}
	return 0;
}

#ifdef OTB_NO_BPF_LOOP
/* Eight bytes per step: most words hold no '\n' and cost a few ALU ops
 * (the classic has-zero-byte test on w ^ "\n\n\n\n\n\n\n\n"); a word with
 * newlines looks at the lines they start. */
static long header_word(__u32 i, void *data)
{
	struct hdr_ctx *h = data;
	__u32 p = i * 8;
	__u64 w, x;

	if (p >= h->n)
		return 1;
	w = LOAD_U64_ALIGNED(&h->s->buf[p & (SCRATCH_MASK & ~7)]);
	x = w ^ 0x0a0a0a0a0a0a0a0aULL;
	if (!((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL))
		return 0;
#pragma unroll
	for (__u32 j = 0; j < 8; j++) {
		if (((w >> (8 * j)) & 0xff) == '\n' && header_line(h, p + j + 1))
			return 1;
	}
	return 0;
}
#endif

#ifndef OTB_NO_BPF_LOOP
/* Where header_line_step's search goes on, between its steps. In a map, not
 * in hdr_ctx: the verifier would follow every value it takes across the
 * steps (a position it must keep precise), and never finish. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} http_line_pos SEC(".maps");

#define LINE_WORDS 8	/* words one step searches for a line's end (longer lines take more steps) */

/* One line per bpf_loop step, not one word: find the '\n' ending the line
 * that h->q is in, 8 bytes at a time, then look at the line after it. A
 * head's lines are 20-40 bytes: a third of the steps (each a call through
 * bpf_loop) of a word per step. No branch per byte: the first '\n' of a
 * word is the lowest flag of the has-zero-byte test (borrows only run
 * upwards), and its byte index comes from a multiply. */
static long header_line_step(__u32 i, void *data)
{
	struct hdr_ctx *h = data;
	__u32 z = 0, *qp = bpf_map_lookup_elem(&http_line_pos, &z);
	__u32 q, base, p, next;
	__u64 m = 0;

	if (!qp)
		return 1;
	q = *qp;
	base = q & ~7U;
	p = base;

#pragma unroll
	for (__u32 k = 0; k < LINE_WORDS; k++) {
		__u64 w, x;

		p = base + k * 8;
		if (p >= h->n)
			return 1;
		w = LOAD_U64_ALIGNED(&h->s->buf[p & (SCRATCH_MASK & ~7)]);
		x = w ^ 0x0a0a0a0a0a0a0a0aULL;
		m = (x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL;
		if (k == 0)	/* bytes before q belong to the line already looked at */
			m &= ~0ULL << (8 * (q & 7));
		if (m)
			break;
	}
	if (!m) {
		*qp = base + LINE_WORDS * 8;	/* a long line: its end in the next step */
		return 0;
	}
	/* the lowest flag is bit 8b+7: (2^(8b) * 0x0706050403020100) >> 56 = 7 - b */
	next = p + 8 - ((((m & -m) >> 7) * 0x0706050403020100ULL) >> 56);
	*qp = next;
	return header_line(h, next);
}
#endif

#ifdef OTB_NO_BPF_LOOP
/* Home of scan_headers' context while header_word_g runs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));	/* sizes: see http_path_ctx */
	__uint(value_size, sizeof(struct hdr_ctx));
} http_hdr_ctx SEC(".maps");

/* header_word as a global function, on the per-CPU copy of the context: see
 * OTB_NO_BPF_LOOP. */
__noinline int header_word_g(__u32 i)
{
	__u32 z = 0;
	struct hdr_ctx *g = bpf_map_lookup_elem(&http_hdr_ctx, &z);
	struct hdr_ctx h;
	int stop;

	if (!g)
		return 1;
	h = *g;
	h.s = bpf_map_lookup_elem(&http_scratch, &z);
	if (!h.s)
		return 1;
	stop = header_word(i, &h);
	h.s = NULL;
	*g = h;
	return stop;
}
#endif

/* The headers: header_word over up to SCRATCH bytes. */
static __always_inline void scan_headers(struct hdr_ctx *h)
{
#ifdef OTB_NO_BPF_LOOP
	__u32 z = 0;
	struct hdr_ctx *g = bpf_map_lookup_elem(&http_hdr_ctx, &z);
	struct scratch *s = h->s;

	if (!g)
		return;
	h->s = NULL;	/* map values hold no pointers */
	*g = *h;
	for (__u32 i = 0; i < SCRATCH / 8; i++)
		if (header_word_g(i))
			break;
	*h = *g;
	h->s = s;
#else
	__u32 z = 0, *qp = bpf_map_lookup_elem(&http_line_pos, &z);

	if (!qp)
		return;
	*qp = 0;
	bpf_loop(SCRATCH / 8, header_line_step, h, 0);
#endif
}

/* Copy a wanted header's value into the span draft, up to its CR: nothing of
 * the following lines (Cookie, Authorization...) is ever copied. */
struct value_ctx {
	struct scratch *s;
	struct http_event *ev;
	__u32 from, n;
	__u8 field;
};

static long value_byte(__u32 k, void *data)
{
	struct value_ctx *v = data;
	__u32 pos = v->from + k;
	char c;

	if (pos >= v->n)
		return 1;
	c = sc(v->s, pos);
	if (c == '\r' || c == '\n')
		return 1;
	k = hide(k);
	switch (v->field) {
	case F_TRACEPARENT:
		if (k >= TP_LEN)
			return 1;
		v->ev->traceparent[k] = c;
		break;
	case F_USER_AGENT:
		if (k >= UA_CAP - 1)
			return 1;
		v->ev->user_agent[k] = c;
		break;
	default:
		if (k >= HOST_CAP - 1)
			return 1;
		v->ev->host[k] = c;
		break;
	}
	return 0;
}

static __always_inline void copy_value(struct hdr_ctx *h, struct http_event *ev, __u8 field)
{
	struct value_ctx v = { .s = h->s, .ev = ev, .n = h->n, .field = field };

	if (field >= 4 || !h->value_at[field & 3])
		return;
	v.from = h->value_at[field & 3];
#ifdef OTB_NO_BPF_LOOP
	for (__u32 k = 0; k < UA_CAP; k++)
		if (value_byte(k, &v))
			break;
#else
	bpf_loop(UA_CAP, value_byte, &v, 0);
#endif
}

/* ------------------------------------------------------------ finishing */

static __always_inline void count_request(struct http_conn *c, __u64 dur)
{
	struct http_key k = {};
	struct http_hist *h;

	k.tgid = c->tgid;
	k.status = c->status;
	k.role = c->role;
	k.method = c->method;
	k.tls = c->tls;
	k.family = c->t.family;
	k.path_hash = c->path_hash;
	if (c->role == ROLE_SERVER) {
		k.port = c->t.lport;
	} else {
		k.port = c->t.rport;
		__builtin_memcpy(k.addr, c->t.raddr, 16);
	}
	h = bpf_map_lookup_elem(&http_hist, &k);
	if (!h) {
		__u32 z = 0;
		struct http_hist *zero = bpf_map_lookup_elem(&http_zero_hist, &z);

		if (!zero)
			return;
		/* the owner's name, not the current task's: a transaction that ends
		 * at TCP_CLOSE ends in softirq, in whatever task runs then */
		__builtin_memcpy(zero->comm, c->comm, sizeof(zero->comm));
		if (bpf_map_update_elem(&http_hist, &k, zero, BPF_NOEXIST) == -7 /* E2BIG */) {
			otb_count(&http_stats, HS_AGG_FULL);
			__builtin_memset(&k, 0, sizeof(k));
			k.tgid = overflow_tgid;
			k.role = c->role;
		}
		h = bpf_map_lookup_elem(&http_hist, &k);
		if (!h)
			return;
	}
	l7_count_duration(&h->count, &h->sum_ns, h->log2, h->sem, dur);
}

static __always_inline bool span_allowed(__u64 now)
{
	if (!l7_rate_allow(&rl_window, &rl_used, max_spans_per_second, now)) {
		otb_count(&http_stats, HS_RATE_LIMITED);
		return false;
	}
	return true;
}

/* Whether a span starting now could still be sent: checked before any
 * header is parsed, so requests past the cap cost no parsing (request_started()'s
 * span_allowed() still enforces the cap) */
static __always_inline bool span_budget_left(__u64 now)
{
	return rl_window != now / NS_PER_S || rl_used < max_spans_per_second;
}

/* ------------------------------------------------- the thread's request */

/* A server request starts on the current thread: its slot names it, for
 * the profiler (thread_request.h). ev: the span's draft, NULL without one. */
static __always_inline void thread_request_begin(struct http_conn *c, __u64 sk, const struct http_event *ev)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct thread_request *t = thread_request_slot(tid);

	c->tid = tid;
	if (!t)
		return;
	if (t->tid && t->tid != tid)
		otb_count(&http_stats, HS_THREAD_SLOT_COLLISION);
	t->tid = 0;
	THREAD_REQ_ORDER();
	t->method = c->method;
	t->route = c->path_hash;
	t->sk = sk;
	t->start_ns = c->req_start_ns;
	t->samples = 0;
	if (ev) {
		__builtin_memcpy(t->trace_id, ev->trace_id, sizeof(t->trace_id));
		t->span_id = ev->span_id;
	} else {
		__builtin_memset(t->trace_id, 0, sizeof(t->trace_id));
		t->span_id = 0;
	}
	THREAD_REQ_ORDER();
	t->tid = tid;
}

/* The request on c is over (answered, or its connection gone): its thread
 * serves no request any more, unless it has since started another. The CPU
 * samples it got are returned. */
static __always_inline __u64 thread_request_end(struct http_conn *c, __u64 sk)
{
	struct thread_request *t;

	if (c->role != ROLE_SERVER || !c->tid)
		return 0;
	t = thread_request_slot(c->tid);
	if (!t || t->tid != c->tid || t->sk != sk || t->start_ns != c->req_start_ns)
		return 0;
	t->tid = 0;
	THREAD_REQ_ORDER();
	return t->samples;
}

/* The transaction on c ended at end_ns: count it, and send its span if
 * sampled. */
OTB_VERIFY_ONCE int finish(__u64 sk, struct http_conn *c, __u64 end_ns)
{
	__u64 start, samples;

	if (!c)
		return 0;
	start = c->req_start_ns;
	samples = thread_request_end(c, sk);
	c->state = ST_IDLE;
	if (!start || end_ns < start)
		return 0;
	count_request(c, end_ns - start);
	if (!c->sampled)
		return 0;
	struct http_event *ev = bpf_map_lookup_elem(&http_drafts, &sk);

	if (!ev || ev->start_ns != start) {
		otb_count(&http_stats, HS_DETAIL_LOST);
		return 0;
	}
	ev->end_ns = end_ns;
	ev->cpu_samples = samples;
	ev->status = c->status;
	/* no wake-up per span (user space drains on a timer), unless the ring
	 * is filling up */
	__u64 wake = bpf_ringbuf_query(&http_events, BPF_RB_AVAIL_DATA) > ring_bytes / 8 ?
		     BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_output(&http_events, ev, sizeof(*ev), wake))
		otb_count(&http_stats, HS_RINGBUF_FULL);
	return 0;
}

/* ------------------------------------------------------------ messages */

/* Whether a valid traceparent's sampled flag is set; -1 without one. */
static __always_inline int parent_sampled(const struct http_event *ev)
{
	char f = ev->traceparent[54];

	if (ev->traceparent[0] != '0' || ev->traceparent[1] != '0' || ev->traceparent[2] != '-' ||
	    ev->traceparent[35] != '-' || ev->traceparent[52] != '-')
		return -1;
	/* flags are hex: bit 0 is "sampled" */
	return f == '1' || f == '3' || f == '5' || f == '7' || f == '9' || f == 'b' || f == 'd' || f == 'f';
}

static __always_inline int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = lower(c);
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* n bytes from 2n hex digits at text, into out unless it is NULL; false
 * if one is not a hex digit or all bytes are zero (an invalid id, as W3C
 * says). */
static __always_inline bool hex_id(const char *text, __u8 *out, int n)
{
	__u8 any = 0;

#pragma unroll
	for (int i = 0; i < 16; i++) {
		if (i >= n)
			break;
		int hi = hex_digit(text[2 * i]), lo = hex_digit(text[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return false;
		any |= hi << 4 | lo;
		if (out)
			out[i] = hi << 4 | lo;
	}
	return any != 0;
}

/* The span's ids: the trace of a valid traceparent (version, trace id and
 * parent id as W3C writes them; user space takes the parent from the same
 * header), else a new trace; always a new span id. */
static __always_inline void span_ids(struct http_event *ev)
{
	const char *tp = ev->traceparent;
	__u64 span;

	if (!(tp[2] == '-' && tp[35] == '-' && tp[52] == '-' && hex_digit(tp[0]) >= 0 && hex_digit(tp[1]) >= 0 &&
	      !(tp[0] == 'f' && tp[1] == 'f') && hex_id(tp + 3, ev->trace_id, 16) && hex_id(tp + 36, NULL, 8))) {
		__u32 *w = (__u32 *)ev->trace_id;

		w[0] = bpf_get_prandom_u32();
		w[1] = bpf_get_prandom_u32();
		w[2] = bpf_get_prandom_u32();
		w[3] = bpf_get_prandom_u32();
		if (!(w[0] | w[1] | w[2] | w[3]))
			w[3] = 1;
	}
	span = (__u64)bpf_get_prandom_u32() << 32 | bpf_get_prandom_u32();
	ev->span_id = span ? span : 1;
}

/* A request just started on c (on_request): its span, if it has one,
 * gets its ids, and a server request's thread is marked as serving it.
 * Apart from on_request, whose frame is at the limit of 6.1's verifier
 * (hook + on_http1 + on_request + a bpf_loop callback <= 512 bytes). */
static __noinline void request_started(struct http_conn *c, __u64 sk)
{
	struct http_event *ev = NULL;

	if (!c)
		return;
	/* the span cap is spent here, not when the span ends: a request's CPU
	 * samples link to its span id from its start, so a span chosen now is
	 * one that will be sent */
	if (c->sampled && !span_allowed(c->req_start_ns))
		c->sampled = 0;
	if (c->sampled)
		ev = bpf_map_lookup_elem(&http_drafts, &sk);
	if (ev)
		span_ids(ev);
	if (c->role == ROLE_SERVER)
		thread_request_begin(c, sk, ev);
}

/* A request starts: parse its line (and, for spans, three headers). */
struct req_start {
	__u64 sk;
	__u64 start;		/* first byte of the request */
	__u32 n;		/* bytes in scratch */
	__u32 skip;		/* length of "METHOD " */
	__u8 method;
	__u8 role;
};

OTB_VERIFY_ONCE int on_request(struct req_start *r, struct http_conn *c)
{
	__u32 z = 0;
	struct scratch *s = bpf_map_lookup_elem(&http_scratch, &z);
	__u64 sk, start;
	__u32 n, skip;
	__u8 method, role;

	if (!r || !c || !s)
		return 0;
	sk = r->sk;
	start = r->start;
	n = r->n;
	skip = r->skip;
	method = r->method;
	role = r->role;

	struct path_ctx p = { .s = s, .start = skip, .n = n, .hash = 0xcbf29ce484222325ULL };
	struct http_event *ev, *zero;
	bool by_ratio;
	int parent;

	ev = bpf_map_lookup_elem(&http_parse, &z);
	zero = bpf_map_lookup_elem(&http_zero_event, &z);
	if (!ev || !zero)
		return 0;
	/* only the path is parsed for every request: the rest of ev is
	 * cleared below if this request is sampled, and bytes past path_len
	 * (another request's path) are never read */
	ev->path_len = 0;
	ev->route_len = path_bytes;
	p.ev = ev;
	scan_path(&p);
	if (!p.end || !is_version(s, p.end + 1, '\r'))
		return 0;	/* not HTTP/1.x after all (or a request line longer than we parse) */
	if (!p.in_query)
		ev->route_len = ev->path_len;

	c->role = role;
	c->state = ST_REQUEST;
	c->method = method;
	c->status = 0;
	c->req_start_ns = start;
	c->body = BODY_UNKNOWN;
	c->sampled = 0;

	/* the route table learns this path (a keep-alive connection asking
	 * for the same path again needs no lookup) */
	if (c->path_hash != p.hash || !c->path_known) {
		if (!bpf_map_lookup_elem(&http_paths, &p.hash))
			bpf_map_update_elem(&http_paths, &p.hash, (struct http_path *)&ev->route_len, BPF_NOEXIST);
		c->path_known = 1;
	}
	c->path_hash = p.hash;

	if (!spans_enabled)
		return 0;
	if (!span_budget_left(start)) {
		otb_count(&http_stats, HS_RATE_LIMITED);
		return 0;
	}
	by_ratio = bpf_get_prandom_u32() <= sample_threshold;
	if (!by_ratio && !parent_based) {
		otb_count(&http_stats, HS_SAMPLED_OUT);
		return 0;
	}
	/* a sampled request's fields start empty (not another request's);
	 * path_len, just set by scan_path, is kept */
	__u16 path_len = ev->path_len;

	bpf_probe_read_kernel(ev, offsetof(struct http_event, route_len), zero);
	ev->path_len = path_len;
	bpf_probe_read_kernel(ev->traceparent, sizeof(ev->traceparent) + sizeof(ev->user_agent) + sizeof(ev->host),
			      zero->traceparent);
	struct hdr_ctx h = { .s = s, .n = n, .content_length = -1,
			     .want = H_TRACEPARENT | H_USER_AGENT | H_HOST };
	scan_headers(&h);
	copy_value(&h, ev, F_TRACEPARENT);
	copy_value(&h, ev, F_USER_AGENT);
	copy_value(&h, ev, F_HOST);
	parent = parent_based ? parent_sampled(ev) : -1;
	if (parent == 0 || (parent < 0 && !by_ratio)) {
		otb_count(&http_stats, HS_SAMPLED_OUT);
		return 0;
	}
	__u64 id = bpf_get_current_pid_tgid();

	ev->start_ns = start;
	ev->tgid = id >> 32;
	ev->tid = (__u32)id;
	ev->t = c->t;
	ev->role = role;
	ev->method = method;
	ev->tls = c->tls;
	ev->flags = p.end - skip > path_bytes;
	ev->cpu_samples = 0;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	if (bpf_map_update_elem(&http_drafts, &sk, ev, BPF_ANY)) {
		otb_count(&http_stats, HS_DETAIL_FULL);
		return 0;
	}
	c->sampled = 1;
	return 0;
}

/* Response headers: status and how the body ends. Returns true when the
 * message is complete within these len bytes. */
static __always_inline bool on_response_head(struct http_conn *c, struct scratch *s, __u32 n,
					     const struct io_src *src, __u64 len)
{
	__u16 status = (sc(s, 9) - '0') * 100 + (sc(s, 10) - '0') * 10 + (sc(s, 11) - '0');

	c->status = status;
	if (status < 200 || c->method == M_HEAD || status == 204 || status == 304) {
		c->body = BODY_NONE;
		return status >= 200;
	}
	struct hdr_ctx h = { .s = s, .n = n, .content_length = -1, .want = H_LENGTH | H_CHUNKED };
	scan_headers(&h);
	if (h.chunked) {
		c->body = BODY_CHUNKED;
		return ends_chunked(src, len);
	}
	if (h.content_length >= 0 && h.end) {
		c->body = BODY_LENGTH;
		c->body_left = (__s64)h.end + h.content_length - (__s64)len;
		return c->body_left <= 0;
	}
	c->body = BODY_UNKNOWN;	/* ends at the next request or the close */
	return false;
}

static __always_inline bool is_response_start(const struct scratch *s, __u32 n)
{
	return n >= 12 && is_version(s, 0, ' ') && sc(s, 9) >= '1' && sc(s, 9) <= '5' &&
	       sc(s, 10) >= '0' && sc(s, 10) <= '9' && sc(s, 11) >= '0' && sc(s, 11) <= '9';
}

/* The last answer on a connection TCP already closed: its state goes now. */
static __always_inline void drop_if_answered_after_close(__u64 sk, struct http_conn *c)
{
	if (c->closed && c->state == ST_IDLE) {
		bpf_map_delete_elem(&http_conns, &sk);
		bpf_map_delete_elem(&http_drafts, &sk);
	}
}

/* The request being started, for on_request (a global function takes it by
 * pointer): per CPU, not on the stack, which the callers' frames fill. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct req_start);
} http_req SEC(".maps");

/* A read or write on connection c (NULL: not tracked yet) as HTTP/1. */
static __always_inline void http1_on_data(struct data_ev *e, struct http_conn *c)
{
	__u64 sk = e->sk, len = e->len, t0 = e->t0, t1 = e->t1;
	const struct io_src *src = &e->src;
	__u8 dir = e->dir, tls = e->tls, nodata = e->nodata;
	struct scratch *s;
	__u32 z = 0, n = 0, skip = 0;
	__u8 req_dir, method;

	if (c && c->closed && !(c->role == ROLE_SERVER && dir == DIR_OUT)) {
		/* anything but the server's late answer: a new connection on the
		 * sock address of one that closed with a request open */
		otb_count(&http_stats, HS_NO_RESPONSE);
		thread_request_end(c, sk);
		bpf_map_delete_elem(&http_conns, &sk);
		c = NULL;
	}
	if (c) {
		c->last_ns = t1;
		req_dir = c->role == ROLE_SERVER ? DIR_IN : DIR_OUT;
		if (c->state != ST_IDLE && dir != req_dir) {
			/* response bytes */
			if (c->state == ST_RESPONSE) {
				c->resp_end_ns = t1;
				if (c->body == BODY_LENGTH) {
					c->body_left -= len;
					if (c->body_left <= 0)
						finish(sk, c, t1);
				} else if (c->body == BODY_CHUNKED && !nodata && ends_chunked(src, len)) {
					finish(sk, c, t1);
				}
				drop_if_answered_after_close(sk, c);
				return;
			}
			/* ST_REQUEST: the response head */
			if (nodata || !(s = bpf_map_lookup_elem(&http_scratch, &z)))
				return;
			n = copy_head(s, src, len, head_bytes, 0, 0);	/* an HTTP connection */
			if (!is_response_start(s, n))
				return;
			if (on_response_head(c, s, n, src, len)) {
				finish(sk, c, t1);
			} else if (c->status >= 200) {
				c->state = ST_RESPONSE;
				c->resp_end_ns = t1;
			}
			drop_if_answered_after_close(sk, c);
			return;
		}
		if (c->state == ST_REQUEST && dir == req_dir)
			return;	/* more of the request: headers or body */
	}
	if (nodata || !(s = bpf_map_lookup_elem(&http_scratch, &z)))
		return;
	if (!c && !e->head_ok)
		return;
	n = copy_head(s, src, len, head_bytes, c ? 0 : HEAD_REQUEST | HEAD_RESPONSE, e->head8);
	method = parse_method(s, n, &skip);
	if (method == 0xff) {
		if (is_response_start(s, n))
			otb_count(&http_stats, HS_UNPAIRED_RESPONSE);
		return;
	}
	if (c && c->state == ST_RESPONSE)
		finish(sk, c, c->resp_end_ns);	/* body length was unknown: it ended before this request */
	if (!c) {
		/* from a zeroed template, not a stack copy: on_data's frame plus
		 * its callers' must stay under 512 bytes for 6.12's verifier */
		struct http_conn *zero = bpf_map_lookup_elem(&http_zero_conn, &z);

		if (!zero || bpf_map_update_elem(&http_conns, &sk, zero, BPF_ANY)) {
			otb_count(&http_stats, HS_CONN_TABLE_FULL);
			return;
		}
		c = bpf_map_lookup_elem(&http_conns, &sk);
		if (!c)
			return;
		read_tuple(sk, &c->t);
		c->last_ns = t1;
	}
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (c->tgid != tgid || !c->comm[0]) {
		c->tgid = tgid;
		bpf_get_current_comm(c->comm, sizeof(c->comm));
	}
	c->tls = tls;
	struct req_start *r = bpf_map_lookup_elem(&http_req, &z);

	if (!r)
		return;

	r->sk = sk;
	r->start = dir == DIR_IN ? t1 : t0;
	r->n = n;
	r->skip = skip;
	r->method = method;
	r->role = dir == DIR_IN ? ROLE_SERVER : ROLE_CLIENT;
	on_request(r, c);
	/* a request started: a span's ids, a server's thread (a client request
	 * without a span needs neither) */
	if (c->state == ST_REQUEST && c->req_start_ns == r->start && (c->sampled || c->role == ROLE_SERVER))
		request_started(c, sk);
}

/* The connection ended: a response without a length ends with it. */
static __always_inline void http1_conn_gone(__u64 sk, struct http_conn *c)
{
	if (c->state == ST_RESPONSE)
		finish(sk, c, c->resp_end_ns);
	else if (c->state == ST_REQUEST) {
		thread_request_end(c, sk);
		otb_count(&http_stats, HS_NO_RESPONSE);
	}
	bpf_map_delete_elem(&http_drafts, &sk);
}

#endif
