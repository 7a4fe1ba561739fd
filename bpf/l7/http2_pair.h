/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/2 streams paired, timed and counted in the kernel; header blocks
 * decoded once, in user space.
 *
 * A header block's meaning depends on the HPACK table of its connection and
 * direction, which only user space keeps (Huffman, strings). But the same
 * bytes mean the same thing as long as that table has not changed, and most
 * traffic repeats itself: a client asking for the same paths, a server
 * answering with the same headers. So each completed block gets a key, its
 * hash and the direction's table generation, and only a block user space
 * has not been sent under that key goes up; the stream itself is paired
 * and its duration counted here, per (connection, request key, response
 * key, trailers key), and user space names the series from the keys.
 *
 * The generation moves when a block that changes the table is sent. Which
 * blocks change it is read from the block's structure (its representations'
 * first bytes and lengths; no Huffman): literals "with incremental indexing"
 * and size updates do. A block that references no dynamic entry needs no
 * table at all (H2_GEN_SELF): nginx answers every request with the same
 * self-contained block that also inserts into the table. Such a block is
 * not sent again while its direction has never referenced the table; the
 * insertions user space then misses are harmless until a block does
 * reference it, which is sent marked "table lost" (user space decodes what
 * it can, and counts the stream partial).
 *
 * Only connections seen from their preface are paired here (the side that
 * carries requests is known); the others go to user space frame by frame.
 * A block the walker could not copy whole in one piece is sent and taken to
 * change the table. Reset streams and sampled ones (max_spans_per_second)
 * also go up, one item each, with their keys and times.
 */
#ifndef OTB_L7_HTTP2_PAIR_H
#define OTB_L7_HTTP2_PAIR_H

#include "l7/conn.h"
#include "l7/duration.h"

#define H2_GEN_SELF 0xffffffffU	/* a block that needs no table: its bytes are its meaning */
#define H2_HPACK_STEPS 384	/* integers of a block read (128 representations at least; more: taken as changing the table) */
#define H2_ITEM_STREAM 0xFE	/* an item that is a stream (reset, or a span candidate), not a frame */

enum h2_kflag {
	H2K_PAIRED = 1,		/* the kernel pairs this stream: the block is for decoding only */
	H2K_BLOCK_END = 2,	/* this piece ends a header block: its key is set */
	H2K_TABLE_LOST = 4,	/* insertions before this block were not sent */
};
enum h2_outcome { H2O_OK = 0, H2O_RESET = 1 };

struct h2_known_key {
	__u64 conn_id;
	__u64 hash;
	__u32 gen;
	__u8 dir;
	__u8 pad[3];
};

struct h2_stream_key {
	__u64 conn_id;
	__u32 sid;
	__u32 pad;
};

struct h2_hkey {
	__u64 conn_id;
	struct h2_bkey req, resp, trl;
	__u32 outcome;
	__u32 pad;
};

struct h2_hist {
	__u64 count;
	__u64 sum_ns;
	__u64 log2[OTB_LOG2_BUCKETS];
	__u64 sem[SEM_BUCKETS];
};

/* An H2_ITEM_STREAM item's payload. */
struct h2_stream_item {
	__u64 start_ns;
	__u64 end_ns;
	struct h2_bkey req, resp, trl;
	__u32 outcome;
	__u32 error;		/* RST_STREAM's code */
};

const volatile __u64 h2_max_spans_per_second = 1000;
__u64 h2_rl_window = 0;
__u64 h2_rl_used = 0;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct h2_known_key);
	__type(value, __u8);
} h2_known SEC(".maps");	/* block keys user space was sent (it may forget none of an open connection) */

/* Streams whose slot (struct h2_state) was taken, and those still open
 * when their connection closed (for user space to sweep). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct h2_stream_key);
	__type(value, struct h2_stream);
} h2_streams SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct h2_hkey);
	__type(value, struct h2_hist);
} h2_hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_hist);
} h2_zero_hist SEC(".maps");

/* Keys and values the functions below build, per CPU: on the stack they
 * would not fit beside their callers' frames (512 bytes in all). */
struct h2_tmp {
	struct h2_hkey hk;
	struct h2_stream ns;
	struct h2_known_key kk;
	struct h2_stream_key sk;
	struct h2_bkey key;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_tmp);
} h2_tmp_buf SEC(".maps");

static __always_inline struct h2_tmp *h2_tmp(void)
{
	__u32 z = 0;

	return bpf_map_lookup_elem(&h2_tmp_buf, &z);
}

/* ------------------------------------------------------- block structure */

/* Where the walk of a block's representations is. In a per-CPU map, not in
 * bpf_loop's context: the verifier would follow every position it takes
 * across the steps, and never finish (as http1.h's header scan). */
struct hpack_pos {
	__u32 i, end;
	__u8 mut, dyn, bad;
	__u8 phase;		/* 0: a representation starts; 1: its name string; 2: its value string */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hpack_pos);
} h2_hpack_pos SEC(".maps");

struct hpack_walk {
	const __u8 *b;		/* the record buffer holding the block (masked reads) */
};

static __always_inline __u8 hp_byte(const __u8 *b, __u32 i)
{
	return b[i & H2_REC_MASK];
}

/* An HPACK integer with an n-bit prefix at p->i (RFC 7541 5.1). */
static __always_inline __u32 hp_int(const __u8 *b, struct hpack_pos *p, __u8 mask)
{
	__u32 i = p->i, v = hp_byte(b, i) & mask;

	i++;
	if (v == mask) {
#pragma unroll
		for (int k = 0; k < 4; k++) {
			__u8 c = hp_byte(b, i);

			i++;
			v += (__u32)(c & 0x7f) << (7 * k);
			if (!(c & 0x80))
				break;
			if (k == 3)
				p->bad = 1;	/* past 2^28: no header is that long */
		}
	}
	p->i = i;
	return v;
}

/* One integer of a block per step (RFC 7541 6): a representation's first
 * byte says whether it inserts into the table, and its index whether it
 * references a dynamic entry (above the 61 static ones); string literals
 * are skipped by their lengths. */
static long hpack_step(__u32 k, void *data)
{
	struct hpack_walk *h = data;
	__u32 z = 0, v;
	struct hpack_pos *p = bpf_map_lookup_elem(&h2_hpack_pos, &z);
	__u8 c;

	if (!p || p->bad || p->i >= p->end)
		return 1;
	if (p->phase) {		/* a string: its length, then its bytes */
		v = hp_int(h->b, p, 0x7f);
		p->i += v;
		p->phase = p->phase == 1 ? 2 : 0;
		return 0;
	}
	c = hp_byte(h->b, p->i);
	if (c & 0x80) {			/* indexed field */
		v = hp_int(h->b, p, 0x7f);
		if (v > 61)
			p->dyn = 1;
		else if (!v)
			p->bad = 1;
		return 0;
	}
	if ((c & 0xe0) == 0x20) {	/* table size update */
		p->mut = 1;
		hp_int(h->b, p, 0x1f);
		return 0;
	}
	if (c & 0x40) {			/* literal with incremental indexing */
		p->mut = 1;
		v = hp_int(h->b, p, 0x3f);
	} else {			/* literal without indexing, or never indexed */
		v = hp_int(h->b, p, 0x0f);
	}
	if (v > 61)
		p->dyn = 1;
	p->phase = v ? 2 : 1;		/* a new name first, or straight to the value */
	return 0;
}

/* FNV-1a-like over a piece in the window, 8 bytes per step (its slack
 * keeps the last load inside). */
struct hash_walk {
	const __u8 *b;
	__u32 at, n;
	__u64 h;
};

static long hash_step(__u32 k, void *data)
{
	struct hash_walk *w = data;
	__u32 off = k * 8;
	__u64 v;

	if (off >= w->n)
		return 1;
	v = load8_at(&w->b[(w->at + off) & H2_WIN_MASK]);
	if (w->n - off < 8)
		v &= (1ULL << (8 * (w->n - off))) - 1;
	w->h = (w->h ^ v) * 0x100000001b3ULL;
	return 0;
}

/* The hash h of a block so far, on with n bytes at window offset off. Most
 * blocks repeat their fields by index, in a few bytes: up to 64 hashed
 * inline, not with a call per word. */
static __always_inline __u64 h2_hash_window(struct h2_pos *p, __u32 off, __u32 n, __u64 h)
{
	if (n <= 64) {
#pragma unroll
		for (int k = 0; k < 8; k++) {
			__u32 o = k * 8;
			__u64 v;

			if (o >= n)
				break;
			v = load8_at(&p->win[(off + o) & H2_WIN_MASK]);
			if (n - o < 8)
				v &= (1ULL << (8 * (n - o))) - 1;
			h = (h ^ v) * 0x100000001b3ULL;
		}
		return h;
	}
	struct hash_walk hw = { .b = p->win, .at = off, .n = n, .h = h };

	bpf_loop(H2_PIECE_MAX / 8, hash_step, &hw, 0);
	return hw.h;
}

/* ------------------------------------------------------------ streams */

/* Global functions below: the verifier checks each once, not per caller
 * and per path through h2_step (inlined, the walk's callback grew past its
 * budget). They take scalars and pointers to sized memory only, and find
 * the call's record buffer themselves (per CPU: the caller's). */

/* Whether a span may still be sent this second (h2_max_spans_per_second). */
static __always_inline bool h2_span_budget(__u64 now)
{
	return l7_rate_allow(&h2_rl_window, &h2_rl_used, h2_max_spans_per_second, now);
}

static __always_inline struct h2_rec *h2_rec_of_cpu(void)
{
	__u32 z = 0;

	return bpf_map_lookup_elem(&h2_rec_buf, &z);
}

/* Append a stream item; its payload to fill. */
static __always_inline struct h2_stream_item *h2_stream_item(struct h2_rec *rec, __u32 sid)
{
	__u32 at = h2_item_at(rec);
	struct h2_item *it = (struct h2_item *)&rec->data[at];

	__builtin_memset(it, 0, sizeof(*it));
	it->length = sizeof(struct h2_stream_item);
	it->piece_len = sizeof(struct h2_stream_item);
	it->stream_id = sid;
	it->type = H2_ITEM_STREAM;
	it->kflags = H2K_PAIRED;
	rec->h.used = at + sizeof(*it) + sizeof(struct h2_stream_item);
	return (struct h2_stream_item *)&rec->data[(at + sizeof(*it)) & H2_REC_MASK];
}

#define H2_COUNTED 0x100	/* h2_stream_item.outcome: already in h2_hist (a span candidate) */

static __always_inline struct h2_slot *h2_slot_of(struct h2_state *st, __u32 sid)
{
	return &st->slots[(sid >> 1) & (H2_SLOTS - 1)];
}

/* Stream sk of connection st: in its slot, or spilled to h2_streams. */
static __always_inline struct h2_stream *h2_stream_find(struct h2_state *st, struct h2_stream_key *sk)
{
	struct h2_slot *sl = h2_slot_of(st, sk->sid);

	if (sl->sid == sk->sid)
		return &sl->s;
	if (!st->spilled)
		return NULL;
	return bpf_map_lookup_elem(&h2_streams, sk);
}

/* A new stream sk: its slot, or h2_streams when the slot is taken. Its
 * fields (zero) to fill; NULL: not kept. */
static __always_inline struct h2_stream *h2_stream_open(struct h2_state *st, struct h2_stream_key *sk,
							struct h2_stream *tmp)
{
	struct h2_slot *sl = h2_slot_of(st, sk->sid);

	if (!sl->sid) {
		sl->sid = sk->sid;
		__builtin_memset(&sl->s, 0, sizeof(sl->s));
		return &sl->s;
	}
	__builtin_memset(tmp, 0, sizeof(*tmp));
	if (bpf_map_update_elem(&h2_streams, sk, tmp, BPF_ANY))
		return NULL;
	__sync_fetch_and_add(&st->spilled, 1);
	return bpf_map_lookup_elem(&h2_streams, sk);
}

/* Stream sk ended: its slot is free again, or its map entry goes. */
static __always_inline void h2_stream_close(struct h2_state *st, struct h2_stream_key *sk)
{
	struct h2_slot *sl = h2_slot_of(st, sk->sid);

	if (sl->sid == sk->sid)
		sl->sid = 0;
	else if (!bpf_map_delete_elem(&h2_streams, sk))
		__sync_fetch_and_add(&st->spilled, -1);
}

/* A paired stream of connection st ended at end_ns: counted here when it
 * ended with its response; sent up when reset, sampled, or not countable
 * here. */
__noinline int h2_finish_g(struct h2_state *st, __u32 sid, __u64 end_ns, __u32 outcome, __u32 error)
{
	struct h2_rec *rec = h2_rec_of_cpu();
	struct h2_tmp *t = h2_tmp();
	bool counted = false;

	if (!st || !rec || !t)
		return 0;
	struct h2_stream_key *sk = &t->sk;

	sk->conn_id = st->conn_id;
	sk->sid = sid;
	sk->pad = 0;
	struct h2_stream *s = h2_stream_find(st, sk);

	if (!s || (outcome == H2O_OK && s->state != 2))
		return 0;	/* not paired here, or DATA before any response headers */
	__u64 start = s->start_ns, dur = end_ns > start ? end_ns - start : 0;

	if (outcome == H2O_OK) {
		struct h2_hkey *k = &t->hk;

		k->conn_id = sk->conn_id;
		k->req = s->req;
		k->resp = s->resp;
		k->trl = s->trl;
		k->outcome = 0;
		k->pad = 0;
		struct h2_hist *h = bpf_map_lookup_elem(&h2_hist, k);

		if (!h) {
			__u32 z = 0;
			struct h2_hist *zero = bpf_map_lookup_elem(&h2_zero_hist, &z);

			if (zero && !bpf_map_update_elem(&h2_hist, k, zero, BPF_NOEXIST))
				h = bpf_map_lookup_elem(&h2_hist, k);
		}
		if (h) {
			l7_count_duration(&h->count, &h->sum_ns, h->log2, h->sem, dur);
			counted = true;
		}
	}
	if (!counted || h2_span_budget(end_ns)) {
		struct h2_stream_item *si = h2_stream_item(rec, sid);

		si->start_ns = start;
		si->end_ns = end_ns;
		si->req = s->req;
		si->resp = s->resp;
		si->trl = s->trl;
		si->outcome = outcome | (counted ? H2_COUNTED : 0);
		si->error = error;
	}
	h2_stream_close(st, sk);
	return 0;
}

/* How the kernel sees the connection a block belongs to: the global
 * functions' view of h2_walk. */
#define H2C_DIR 1		/* the block's direction (enum io_dir) */
#define H2C_PAIRED 2		/* the kernel pairs this connection's streams */
#define H2C_REQ_IN 4		/* requests travel DIR_IN (the owner is the server) */

/* A header block (key) ended on a paired connection: a request opens its
 * stream, a response or its trailers fill it in, END_STREAM ends it. */
static __always_inline int h2_pair_block(struct h2_rec *rec, struct h2_tmp *t, struct h2_state *st,
					 struct h2_dir *d, __u32 ctx, struct h2_bkey *key)
{
	struct h2_stream_key *sk = &t->sk;
	__u8 dir = ctx & H2C_DIR, req_dir = (ctx & H2C_REQ_IN) ? DIR_IN : DIR_OUT;

	sk->conn_id = st->conn_id;
	sk->sid = d->stream_id;
	sk->pad = 0;
	struct h2_stream *s = h2_stream_find(st, sk);

	if (dir == req_dir) {
		if (s || !(sk->sid & 1))
			return 0;	/* request trailers, or not a stream a client opens */
		s = h2_stream_open(st, sk, &t->ns);
		if (!s)
			return 0;
		s->start_ns = rec->h.ts;
		s->req = *key;
		s->tid = rec->h.tid;
		s->state = 1;
		return 0;
	}
	if (!s)
		return 0;	/* an answer to a request not seen (older than the agent, or evicted) */
	if (s->state == 1) {
		s->resp = *key;
		s->state = 2;
	} else {
		s->trl = *key;	/* trailers (or, after a 1xx, the final response: user space tells) */
	}
	return (d->bflags & H2_END_STREAM) ? 1 : 0;
}

/* Whether a block's representations (record buffer bytes [i, end)) change
 * the table (bit 0) or reference its dynamic entries (bit 1); both when
 * they cannot be read to their end. */
__noinline int h2_hpack_classify(__u32 i, __u32 end)
{
	__u32 z = 0;
	struct h2_rec *rec = h2_rec_of_cpu();
	struct hpack_pos *p = bpf_map_lookup_elem(&h2_hpack_pos, &z);

	if (!rec || !p)
		return 3;
	struct hpack_walk h = { .b = rec->data };

	p->i = i;
	p->end = end;
	p->mut = p->dyn = p->bad = p->phase = 0;
	bpf_loop(H2_HPACK_STEPS, hpack_step, &h, 0);
	if (p->bad || p->phase || p->i != p->end)
		return 3;
	return (p->mut ? 1 : 0) | (p->dyn ? 2 : 0);
}

#define H2_NO_ITEM 0xffffffffU	/* h2_block_end_g: the block is in the window, no item yet */

/* A header block ended with the piece at item `at` (n payload bytes), or,
 * with at H2_NO_ITEM, with a block that is one piece in the window at
 * win_off (appended only if it is to be sent), in direction ctx & H2C_DIR
 * of connection st: key it, send it or not, and pair its stream. 1: the
 * stream ended with it (the caller finishes it: calling h2_finish_g from
 * here would stack their frames). */
__noinline int h2_block_end_g(struct h2_state *st, __u32 at, __u32 n, __u32 ctx, __u32 win_off)
{
	__u32 z = 0;
	struct h2_rec *rec = h2_rec_of_cpu();
	struct h2_pos *p = bpf_map_lookup_elem(&h2_pos_buf, &z);
	struct h2_tmp *t = h2_tmp();
	bool paired = ctx & H2C_PAIRED, single, self, send = true;
	__u8 mut = 1, dyn = 1, *known = NULL;

	if (!st || !rec || !p || !t)
		return 0;
	struct h2_dir *d = &st->d[ctx & H2C_DIR];

	single = d->bpieces == 1 && !d->bcut;
	struct h2_known_key *kk = &t->kk;
	struct h2_bkey *key = &t->key;

	__builtin_memset(kk, 0, sizeof(*kk));
	kk->conn_id = st->conn_id;
	kk->hash = d->bhash;
	kk->dir = ctx & H2C_DIR;
	if (paired && single) {
		/* a block seen before says what it is (its classification, kept
		 * with its key): no need to read it again. Under this generation:
		 * one that does not change the table; as self-contained: one that
		 * needs none */
		if (d->kc_cls && d->kc_hash == d->bhash && (d->kc_gen == d->gen || d->kc_gen == H2_GEN_SELF)) {
			kk->gen = d->kc_gen;	/* the block this direction sent last time */
			known = &d->kc_cls;
		} else {
			kk->gen = d->gen;
			known = bpf_map_lookup_elem(&h2_known, kk);
			if (!known) {
				kk->gen = H2_GEN_SELF;
				known = bpf_map_lookup_elem(&h2_known, kk);
			}
		}
		if (known) {
			d->kc_hash = kk->hash;
			d->kc_gen = kk->gen;
			d->kc_cls = *known;
		}
	}
	if (at == H2_NO_ITEM && !known) {
		/* to be read here, and sent */
		at = h2_item(rec, d, d->frame, 0, p->win, win_off, n);
		n = ((struct h2_item *)&rec->data[at & H2_REC_MASK])->piece_len;
	}
	if (known) {
		mut = *known & 1;
		dyn = (*known >> 1) & 1;
	} else if (single) {
		/* its representations, past padding and priority */
		__u32 base = at + sizeof(struct h2_item), off = 0, pad = 0;

		if (d->bflags & 0x8) {
			pad = rec->data[base & H2_REC_MASK];
			off = 1;
		}
		off += d->btype == H2_PUSH ? 4 : (d->bflags & 0x20) ? 5 : 0;
		if (off + pad <= n) {
			int cls = h2_hpack_classify(base + off, base + n - pad);

			mut = cls & 1;
			dyn = (cls >> 1) & 1;
		}
	}
	self = single && !dyn && !d->dyn_used;
	key->hash = d->bhash;
	key->pad = 0;
	__u8 kf = H2K_BLOCK_END | (paired ? H2K_PAIRED : 0);

	if (dyn) {
		if (d->stale)
			kf |= H2K_TABLE_LOST;
		d->stale = 0;
		d->dyn_used = 1;
	}
	/* a self-contained block that does not change the table means the same
	 * under any generation: keyed as self-contained even once the direction
	 * references its table */
	key->gen = (self || (single && !dyn && !mut)) ? H2_GEN_SELF : d->gen;
	if (paired && single && (self || !mut)) {
		if (known && kk->gen == key->gen) {
			send = false;
		} else {
			__u8 cls = 4 | (dyn << 1) | mut;

			kk->gen = key->gen;
			bpf_map_update_elem(&h2_known, kk, &cls, BPF_ANY);
			d->kc_hash = kk->hash;
			d->kc_gen = kk->gen;
			d->kc_cls = cls;
		}
	}
	if (mut) {
		if (send)
			d->gen++;
		else
			d->stale = 1;	/* a repeat user space would apply again: harmless until a reference */
	}
	if (!send) {
		if (at != H2_NO_ITEM)
			rec->h.used = at;	/* the block's one piece, just appended */
	} else {
		if (at == H2_NO_ITEM)
			at = h2_item(rec, d, d->frame, 0, p->win, win_off, n);
		struct h2_item *it = (struct h2_item *)&rec->data[at & H2_REC_MASK];

		it->kflags = kf;
		it->bhash = key->hash;
		it->bgen = key->gen;
	}
	if (paired && d->btype == H2_HEADERS)
		return h2_pair_block(rec, t, st, d, ctx, key);
	return 0;
}

static __always_inline __u32 h2_ctx(struct h2_walk *w)
{
	return (w->p->dir & H2C_DIR) | (w->p->paired ? H2C_PAIRED : 0) |
	       (w->st->role_hint == ROLE_SERVER ? H2C_REQ_IN : 0);
}

/* DATA with END_STREAM on a paired connection. */
static __always_inline void h2_pair_data_end(struct h2_walk *w)
{
	if (w->p->dir == ((h2_ctx(w) & H2C_REQ_IN) ? DIR_IN : DIR_OUT))
		return;
	h2_finish_g(w->st, w->d->stream_id, w->rec->h.ts, H2O_OK, 0);
}

/* RST_STREAM (its 4 payload bytes at item `at`) on a paired connection:
 * the stream goes up, with the error code. */
static __always_inline void h2_pair_reset(struct h2_walk *w, __u32 at)
{
	__u32 base = at + sizeof(struct h2_item), code;

	code = (__u32)w->rec->data[base & H2_REC_MASK] << 24 | (__u32)w->rec->data[(base + 1) & H2_REC_MASK] << 16 |
	       (__u32)w->rec->data[(base + 2) & H2_REC_MASK] << 8 | w->rec->data[(base + 3) & H2_REC_MASK];
	w->rec->h.used = at;	/* the frame itself is not needed */
	h2_finish_g(w->st, w->d->stream_id, w->rec->h.ts, H2O_RESET, code);
}

/* ------------------------------------------------------------- blocks */

/* A header block starts (HEADERS or PUSH_PROMISE; CONTINUATIONs go on). */
static __always_inline void h2_block_begin(struct h2_dir *d)
{
	d->bhash = 0xcbf29ce484222325ULL;
	d->bpieces = 0;
	d->bcut = 0;
	d->bflags = d->flags;
	d->btype = d->type;
}

/* A piece of a header block (HEADERS, PUSH_PROMISE, CONTINUATION) was
 * appended at item `at`, asking for want bytes from piece_off on, which the
 * window holds at win_off: hash it; at the block's end, key it. */
static __always_inline void h2_block_piece(struct h2_walk *w, __u32 at, __u32 want, __u32 piece_off,
					   __u32 win_off)
{
	struct h2_dir *d = w->d;
	struct h2_item *it = (struct h2_item *)&w->rec->data[at & H2_REC_MASK];
	__u32 n = it->piece_len;

	if (piece_off == 0 && d->type != H2_CONT)
		h2_block_begin(d);
	if (n != want || d->length > H2_BLOCK_MAX)
		d->bcut = 1;	/* bytes of it were not sent: never taken as known */
	d->bhash = h2_hash_window(w->p, win_off, n, d->bhash);
	d->bpieces++;
	if (!d->cap_left && (d->flags & H2_END_HEADERS) && h2_block_end_g(w->st, at, n, h2_ctx(w), 0) == 1)
		h2_finish_g(w->st, d->stream_id, w->rec->h.ts, H2O_OK, 0);
}

#endif
