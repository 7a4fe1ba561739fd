/* SPDX-License-Identifier: GPL-2.0 */
/* HTTP/2 (and gRPC on it): frames found in the kernel, decoded in user space.
 *
 * A connection is HTTP/2 from the client's preface ("PRI * HTTP/2.0...";
 * the side that writes it is the client) or, for one opened before we
 * looked, from a first read or write that starts with a plausible HEADERS
 * frame (user space then tells requests from responses by their pseudo
 * headers). From then on every read and write of it is walked frame by
 * frame, per direction: a frame header (9 bytes: length, type, flags,
 * stream) gives where the next one starts, so payloads are skipped without
 * being read, across calls, iovecs and TLS records alike.
 *
 * HPACK cannot be decoded here: a header block's meaning depends on every
 * block before it on the connection (the dynamic table), and on Huffman
 * codes. So the frames that matter go to user space as they are: header
 * blocks (HEADERS, CONTINUATION, PUSH_PROMISE: up to H2_BLOCK_MAX bytes),
 * DATA frames that end a stream (header only), RST_STREAM and GOAWAY. One
 * ring record per read or write carries all of that call's frames, so a
 * multiplexed read of many streams costs one record. DATA payloads, window
 * updates, pings and settings never leave the kernel.
 *
 * Needs bpf_loop (5.17+): the HTTP/1-only build for older kernels leaves
 * this out (user space says so).
 */
#ifndef OTB_L7_HTTP2_H
#define OTB_L7_HTTP2_H

#include "l7/conn.h"

#define H2_PIECE_MAX 1024	/* payload bytes of one frame per piece (an item of a record) */
#define H2_BLOCK_MAX 4096	/* payload bytes of one frame sent at most */
#define H2_REC_DATA 8192	/* a record's item area (a power of two) */
#define H2_REC_MASK (H2_REC_DATA - 1)
#define H2_ITEM_ROOM (H2_REC_DATA - 64 - H2_PIECE_MAX)	/* fill level that sends the record */
#define H2_STEPS 8192		/* loop steps per call (a frame header or a piece each): a 64 KiB read of the smallest frames */
#define H2_IOV_CHUNK 32		/* iovecs read at a time */
#define H2_MAX_IOVS 1024	/* iovecs of one call followed (IOV_MAX) */
#define H2_MAX_FRAME 16777215	/* the 24-bit length field's limit */
#define H2_WIN 1024		/* the window: bytes of the call read at once (H2_PIECE_MAX at most) */
#define H2_WIN_MASK (H2_WIN - 1)
#define H2_WIN_READ 512		/* bytes read into it at least, when the buffer has them */

enum h2_type { H2_DATA = 0, H2_HEADERS = 1, H2_PRIORITY = 2, H2_RST = 3, H2_SETTINGS = 4, H2_PUSH = 5,
	       H2_PING = 6, H2_GOAWAY = 7, H2_WINDOW = 8, H2_CONT = 9 };
#define H2_END_STREAM 0x1
#define H2_END_HEADERS 0x4

const volatile __u32 h2_ring_bytes = 4 << 20;	/* h2_events' size */
const volatile __u8 h2_enabled = 1;		/* probes.http.http2 */

/* One direction of a connection, in its own byte offsets. */
struct h2_dir {
	__u64 pos;		/* bytes of this direction seen so far */
	__u64 next;		/* offset of the next frame header */
	__u64 frame;		/* offset of the frame whose payload is being sent */
	__u64 cap_at;		/* offset of its next payload byte to send */
	__u32 cap_left;		/* payload bytes of it still to send */
	__u32 length;		/* that frame's header */
	__u32 stream_id;
	__u8 type;
	__u8 flags;
	__u8 part_len;		/* bytes of the next frame header already read (into part) */
	__u8 resync;		/* offsets lost: the next call must start at a frame */
	__u8 gap;		/* bytes were missed: the next record says so */
	__u8 bflags;		/* the header block being read: its HEADERS frame's flags */
	__u8 bpieces;		/* ... pieces so far (one: its structure can be read here) */
	__u8 bcut;		/* ... bytes of it were not sent */
	__u8 part[24];		/* a frame header split across calls or iovecs */
	__u64 bhash;		/* the header block being read: hash of its bytes so far */
	__u32 gen;		/* table generation: blocks that change the table sent so far */
	__u8 dyn_used;		/* a block referenced the dynamic table */
	__u8 stale;		/* a block that changes the table was not sent since */
	__u8 btype;		/* the header block's first frame's type */
	/* The last block key this direction found in h2_known or put there,
	 * and its value (0: none). A peer repeats its blocks, and a lookup in
	 * that big table is a cache miss. */
	__u8 kc_cls;
	__u64 kc_hash;
	__u32 kc_gen;
	__u32 pad3;
};

/* A header block's key (http2_pair.h): its hash, and the HPACK table
 * generation of its direction that gives it its meaning. */
struct h2_bkey {
	__u64 hash;
	__u32 gen;
	__u32 pad;
};

/* A stream the kernel pairs (http2_pair.h), from its request's headers. */
struct h2_stream {
	__u64 start_ns;
	struct h2_bkey req, resp, trl;
	__u32 tid;
	__u8 state;		/* 1: request headers seen; 2: response headers too */
	__u8 pad[3];
};

/* Streams in flight live in their connection's state, one slot per stream
 * ID modulo H2_SLOTS (client streams are odd and counted up, so the ones in
 * flight together rarely share a slot): no map operation per stream. One
 * whose slot is taken goes to h2_streams. */
#define H2_SLOTS 16

struct h2_slot {
	__u32 sid;		/* 0: free (no stream has ID 0) */
	__u32 pad;
	struct h2_stream s;
};

struct h2_state {
	__u64 conn_id;
	struct h2_dir d[2];	/* by enum io_dir */
	__u8 fresh;		/* seen from its preface: user space knows the whole HPACK state */
	__u8 role_hint;		/* enum http_role of the owner, from the preface; ROLE_NONE if joined */
	__u8 pad[2];
	__u32 spilled;		/* its streams put in h2_streams (0: none there, no lookup) */
	struct h2_slot slots[H2_SLOTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);	/* struct sock * */
	__type(value, struct h2_state);
} h2_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_state);
} h2_zero_state SEC(".maps");	/* stays zero: a new connection's frame state */

/* A record: this head, then `used` bytes of items, each a struct h2_item
 * and piece_len payload bytes, padded to 8. */
struct h2_rec_head {
	__u64 conn_id;
	__u64 ts;		/* when the call returned */
	__u32 tgid;
	__u32 tid;
	struct conn_tuple t;
	__u16 used;
	__u8 dir;
	__u8 tls;
	__u8 role_hint;
	__u8 fresh;
	__u8 gap;		/* bytes of this direction were missed before these frames */
	__u8 closed;		/* no items: the connection ended */
	char comm[16];
};

struct h2_item {
	__u64 frame_pos;	/* the frame's offset in its direction */
	__u32 length;
	__u32 stream_id;
	__u16 piece_off;	/* where the piece starts in the frame's payload */
	__u16 piece_len;
	__u8 type;
	__u8 flags;
	__u8 kflags;		/* enum h2_kflag */
	__u8 pad;
	__u64 bhash;		/* with H2K_BLOCK_END: the block's key */
	__u32 bgen;
	__u32 pad2;
};

struct h2_rec {
	struct h2_rec_head h;
	__u8 data[H2_REC_DATA + H2_PIECE_MAX + 64];	/* slack: an item at a masked offset stays inside */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_rec);
} h2_rec_buf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} h2_events SEC(".maps");

/* A call's iovecs, H2_IOV_CHUNK at a time (gRPC writes a header block as
 * one iovec per field). */
struct h2_iovs {
	struct iovec v[H2_IOV_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_iovs);
} h2_iov_buf SEC(".maps");

/* Where the walk of one call is. Per CPU, not on the stack: the frames of
 * the hook, on_data, the walk's callback and the functions it calls must fit
 * in 512 bytes together (6.1 and 6.12 count them strictly). */
struct h2_pos {
	__u64 buf;		/* the buffer, or the iovec array */
	__u64 start;		/* direction offset of the call's first byte */
	__u64 end;		/* ... and one past its last */
	__u64 seg_start;	/* the iovec the cursor is in: its first byte's direction offset */
	__u32 niov;
	__u32 seg;		/* ... its index */
	__u32 chunk;		/* index of the first iovec in the iovec buffer */
	__u8 dir;
	__u8 paired;		/* the kernel pairs this connection's streams */
	__u8 vec;		/* an iovec array, not one buffer */
	__u8 pad;
	/* The window: bytes [win_pos, win_pos + win_len) of the call, from one
	 * buffer, copied with one read. A multiplexed read or write holds many
	 * small frames: their headers and header blocks are read here, not
	 * with a read of user memory each (whose fixed cost is most of it). */
	__u64 win_pos;
	__u32 win_len;
	__u32 pad2;
	__u8 win[H2_WIN + 16];	/* slack: a masked 8-byte load or 9-byte header stays inside */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct h2_pos);
} h2_pos_buf SEC(".maps");

/* The walk of one call: bpf_loop's context, its pointers only. */
struct h2_walk {
	struct h2_dir *d;
	struct h2_rec *rec;
	struct h2_iovs *iov;
	struct h2_state *st;
	struct h2_pos *p;
};

/* Make iovec i readable in w->iov; false if it cannot be. */
static __always_inline bool h2_iov_load(struct h2_walk *w, __u32 i)
{
	__u32 n;

	if (i - w->p->chunk < H2_IOV_CHUNK)
		return true;
	n = w->p->niov - i;
	if (n > H2_IOV_CHUNK)
		n = H2_IOV_CHUNK;
	__u64 size = (__u64)n * sizeof(struct iovec);

	asm volatile("%0 &= 1023" : "+r"(size));	/* the bound on the helper's own register */
	if (size == 0 || size > sizeof(w->iov->v))
		return false;
	void *src = (void *)(w->p->buf + (__u64)i * sizeof(struct iovec));

	if (size <= 64) {
		/* through the stack: a read into it skips the hardened-usercopy
		 * checks on its destination that a map value gets (a third of
		 * a small read's cost) */
		__u64 tmp[8];

		if (bpf_probe_read_user(tmp, size, src))
			return false;
		__builtin_memcpy(w->iov->v, tmp, sizeof(tmp));
	} else if (bpf_probe_read_user(w->iov->v, size, src)) {
		return false;
	}
	w->p->chunk = i;
	return true;
}

#define H2_IOV_STEP 8		/* iovecs the cursor passes per loop step */

/* The user address of direction offset pos, and how many bytes from there
 * are in the same buffer; 0 if pos is not in this call, or (*avail set to
 * 1) not reached yet: the cursor moves H2_IOV_STEP iovecs per call, and
 * only forward (offsets only grow within a call). */
static __always_inline __u64 h2_addr(struct h2_walk *w, __u64 pos, __u64 *avail)
{
	struct h2_pos *p = w->p;
	__u64 lim = p->end;

	*avail = 0;
	if (pos < p->start || pos >= lim)
		return 0;
	if (!p->vec) {
		*avail = lim - pos;
		return p->buf + (pos - p->start);
	}
	/* one chunk of iovecs read per call at most: no helper in the loop */
	if (p->seg >= p->niov || !h2_iov_load(w, p->seg))
		return 0;
	for (int k = 0; k < H2_IOV_STEP; k++) {
		__u32 i = p->seg, j = i - p->chunk;
		__u64 len;

		if (i >= p->niov || j >= H2_IOV_CHUNK)
			break;
		j = hide(j) & (H2_IOV_CHUNK - 1);	/* a bound the verifier sees on the index register */
		len = w->iov->v[j].iov_len;
		if (pos < p->seg_start + len) {
			__u64 seg_end = p->seg_start + len;

			*avail = (seg_end < lim ? seg_end : lim) - pos;
			return (__u64)w->iov->v[j].iov_base + (pos - p->seg_start);
		}
		p->seg_start += len;
		p->seg = i + 1;
	}
	*avail = 1;	/* further on: the next step goes on from here */
	return 0;
}

/* Send the record built so far (if it holds anything) and start a new one. */
static __always_inline void h2_flush(struct h2_rec *rec)
{
	__u32 used = rec->h.used;

	if (!used)
		return;
	__u64 wake = bpf_ringbuf_query(&h2_events, BPF_RB_AVAIL_DATA) > h2_ring_bytes / 8 ?
		     BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;

	if (bpf_ringbuf_output(&h2_events, rec, sizeof(rec->h) + (used & H2_REC_MASK), wake))
		otb_count(&http_stats, HS_H2_RINGBUF_FULL);
	rec->h.used = 0;
	rec->h.gap = 0;
}

/* Where the next item goes: the record is sent first when it is full. */
static __always_inline __u32 h2_item_at(struct h2_rec *rec)
{
	__u32 at = rec->h.used;

	if (at > H2_ITEM_ROOM) {
		h2_flush(rec);
		at = 0;
	}
	return at & H2_REC_MASK;
}

/* Make the window hold direction offset pos and, if the buffer it is in
 * has them, the want bytes from there on (want <= H2_WIN). Its offset in
 * the window; -1 when pos is not in this call, -2 when the iovec cursor
 * has not reached it yet (the next step goes on). */
static __always_inline long h2_window(struct h2_walk *w, __u64 pos, __u32 want)
{
	struct h2_pos *p = w->p;
	__u64 off = pos - p->win_pos, avail, at;

	/* all there, or as much as there is: a window that starts at pos was
	 * cut short by its buffer's end */
	if (pos >= p->win_pos && off < p->win_len && (off + want <= p->win_len || !off))
		return off;
	at = h2_addr(w, pos, &avail);
	if (!at)
		return avail ? -2 : -1;
	__u64 size = want > H2_WIN_READ ? want : H2_WIN_READ;

	if (size > avail)
		size = avail;
	asm volatile("%0 &= 2047" : "+r"(size));	/* the bound on the helper's own register */
	if (size > H2_WIN)
		size = H2_WIN;
	p->win_len = 0;
	if (!size)
		return -1;
	if (size <= 64) {
		/* through the stack, as h2_iov_load's */
		__u64 tmp[8];

		if (bpf_probe_read_user(tmp, size, (void *)at))
			return -1;
		__builtin_memcpy(p->win, tmp, sizeof(tmp));
	} else if (bpf_probe_read_user(p->win, size, (void *)at)) {
		return -1;
	}
	p->win_pos = pos;
	p->win_len = size;
	return 0;
}

/* Append an item for the frame described in d, with n payload bytes from
 * the window at win_off (n may be 0). */
static __always_inline __u32 h2_item(struct h2_rec *rec, struct h2_dir *d, __u64 frame, __u32 piece_off,
				     const __u8 *win, __u32 win_off, __u32 n)
{
	__u32 at = h2_item_at(rec);
	struct h2_item *it = (struct h2_item *)&rec->data[at];

	it->frame_pos = frame;
	it->length = d->length;
	it->stream_id = d->stream_id;
	it->piece_off = piece_off;
	it->type = d->type;
	it->flags = d->flags;
	it->kflags = 0;
	__u64 size = n > H2_PIECE_MAX ? H2_PIECE_MAX : n;

	/* the bound on the very register the helper takes (a 64-bit one: no
	 * zero-extended copy without it) */
	asm volatile("%0 &= 2047" : "+r"(size));
	if (size > H2_PIECE_MAX)
		size = H2_PIECE_MAX;
	if (size && bpf_probe_read_kernel(&rec->data[(at + sizeof(*it)) & H2_REC_MASK], size,
					  &win[win_off & H2_WIN_MASK]))
		size = 0;
	n = size;
	it->piece_len = n;
	rec->h.used = at + ((sizeof(*it) + n + 7) & ~7U);
	return at;
}

#include "l7/http2_pair.h"

/* Whether 9 header bytes can start a frame: a known type on a stream it may
 * use, the reserved bit clear, and a length no peer sends by default. */
static __always_inline bool h2_plausible(const __u8 *h)
{
	__u32 len = (__u32)h[0] << 16 | (__u32)h[1] << 8 | h[2];
	__u32 sid = ((__u32)(h[5] & 0x7f) << 24) | (__u32)h[6] << 16 | (__u32)h[7] << 8 | h[8];
	__u8 type = h[3];

	if ((h[5] & 0x80) || len > 16384 || type > H2_CONT)
		return false;
	if (type == H2_SETTINGS || type == H2_PING || type == H2_GOAWAY)
		return sid == 0;
	return type == H2_WINDOW || sid != 0;
}

/* Frame header fields from its 9 bytes: the first 8 as a little-endian
 * word, and the ninth. */
static __always_inline void h2_header(struct h2_dir *d, __u64 v, __u8 b8)
{
	d->length = (__u32)(v & 0xff) << 16 | (__u32)(v & 0xff00) | (__u32)((v >> 16) & 0xff);
	d->type = v >> 24;
	d->flags = v >> 32;
	d->stream_id = (__u32)((v >> 40) & 0x7f) << 24 | (__u32)((v >> 48) & 0xff) << 16 |
		       (__u32)((v >> 56) & 0xff) << 8 | b8;
}

/* A header block that is one frame, whole in the window at off: hashed
 * there, and keyed. A block user space already has needs no item at all. */
static __always_inline void h2_block_whole(struct h2_walk *w, __u32 off, __u32 n)
{
	struct h2_dir *d = w->d;

	h2_block_begin(d);
	d->bhash = h2_hash_window(w->p, off, n, d->bhash);
	d->bpieces = 1;
	if (h2_block_end_g(w->st, H2_NO_ITEM, n, h2_ctx(w), off) == 1)
		h2_finish_g(w->st, d->stream_id, w->rec->h.ts, H2O_OK, 0);
}

/* The next frame's header, at d->next: parsed, and whether any of its
 * payload is to be captured (1), or not, or not yet (0), or the walk ends
 * (-1). */
static __always_inline int h2_next_frame(struct h2_walk *w)
{
	struct h2_dir *d = w->d;
	struct h2_pos *p = w->p;
	long off;

	if (d->next >= p->end)
		return -1;
	/* the header's bytes not read yet: the rest of a split one, or all 9 */
	__u32 have = d->part_len & 15;

	if (have > 8)
		have = 8;
	off = h2_window(w, d->next + have, 9 - have);
	if (off < 0)
		return off == -1 ? -1 : 0;
	__u32 got = p->win_len - off;

	if (!have && got >= 9) {
		h2_header(d, load8_at(&p->win[off & H2_WIN_MASK]), p->win[(off + 8) & H2_WIN_MASK]);
	} else {
		/* split across iovecs or calls: gathered in part */
		__u32 take = 9 - have < got ? 9 - have : got;

		for (int k = 0; k < 9; k++) {
			if (k >= take)
				break;
			d->part[(have + k) & 15] = p->win[(off + k) & H2_WIN_MASK];
		}
		have += take;
		d->part_len = have;
		if (have < 9)
			return 0;	/* the header goes on in the next iovec or call */
		h2_header(d, load8_at(d->part), d->part[8]);
	}
	d->part_len = 0;

	__u64 frame = d->next;

	d->next = frame + 9 + d->length;
	switch (d->type) {
	case H2_HEADERS:
	case H2_CONT:
	case H2_PUSH:
		d->cap_left = d->length < H2_BLOCK_MAX ? d->length : H2_BLOCK_MAX;
		if (d->length > H2_BLOCK_MAX)
			otb_count(&http_stats, HS_H2_BLOCK_CUT);
		break;
	case H2_RST:
		d->cap_left = d->length < 4 ? d->length : 4;
		break;
	case H2_GOAWAY:
		d->cap_left = d->length < 8 ? d->length : 8;
		break;
	case H2_DATA:
		if (!(d->flags & H2_END_STREAM))
			return 0;
		if (p->paired)
			h2_pair_data_end(w);
		else
			h2_item(w->rec, d, frame, 0, p->win, 0, 0);
		return 0;
	default:
		return 0;
	}
	d->frame = frame;
	d->cap_at = frame + 9;
	if (!d->cap_left) {	/* an empty block (a CONTINUATION ending it): its flags matter */
		__u32 it = h2_item(w->rec, d, frame, 0, p->win, 0, 0);

		if (d->type != H2_RST && d->type != H2_GOAWAY)
			h2_block_piece(w, it, 0, 0, 0);
		return 0;
	}
	return 1;
}

/* One step of a call's walk: the next frame header, and as much of its
 * payload as is to be sent and at hand; or, in a frame being captured, its
 * next piece. 1 ends the walk. */
static long h2_step(__u32 i, void *data)
{
	struct h2_walk *w = data;
	struct h2_dir *d = w->d;
	struct h2_pos *p = w->p;
	long off;

	if (!d->cap_left) {
		int next = h2_next_frame(w);

		if (next <= 0)
			return next < 0;
	}
	if (d->cap_at >= p->end)
		return 1;	/* the payload goes on in the next call */
	__u32 n = d->cap_left < H2_PIECE_MAX ? d->cap_left : H2_PIECE_MAX;

	off = h2_window(w, d->cap_at, n);
	if (off < 0)
		return off == -1;
	if (n > p->win_len - off)
		n = p->win_len - off;	/* the rest is in the next buffer */
	__u32 piece_off = (__u32)(d->cap_at - d->frame - 9);
	bool block = d->type == H2_HEADERS || d->type == H2_CONT || d->type == H2_PUSH;

	d->cap_at += n;
	d->cap_left -= n;
	if (block && p->paired && d->type != H2_CONT && !piece_off && n == d->length &&
	    (d->flags & H2_END_HEADERS)) {
		h2_block_whole(w, off, n);
		return 0;
	}
	__u32 it = h2_item(w->rec, d, d->frame, piece_off, p->win, off, n);

	if (block)
		h2_block_piece(w, it, n, piece_off, off);
	else if (d->type == H2_RST && p->paired && !d->cap_left)
		h2_pair_reset(w, it);
	return 0;
}

/* Whether the call's first bytes (at direction offset start) are a plausible
 * frame header. Not inlined: its buffer stays out of the walk's frame. */
static __noinline bool h2_at_frame(struct h2_walk *w, __u64 start)
{
	__u8 h[9];
	__u64 avail, at;

	if (!w)
		return false;
	at = h2_addr(w, start, &avail);
	return at && avail >= 9 && !bpf_probe_read_user(h, 9, (void *)at) && h2_plausible(h);
}

/* The call's bytes [d->pos, d->pos + len) of connection st, direction dir. */
static __always_inline void h2_walk_call(struct data_ev *e, struct http_conn *c, struct h2_state *st)
{
	__u32 z = 0;
	__u8 dir = e->dir & 1;
	struct h2_dir *d = &st->d[dir];
	struct h2_rec *rec = bpf_map_lookup_elem(&h2_rec_buf, &z);
	struct h2_pos *p = bpf_map_lookup_elem(&h2_pos_buf, &z);
	struct h2_iovs *iov = bpf_map_lookup_elem(&h2_iov_buf, &z);
	struct h2_walk w = { .d = d, .rec = rec, .iov = iov, .st = st, .p = p };
	__u64 start = d->pos;

	if (!rec || !p || !iov)
		return;
	d->pos = start + e->len;
	if (e->nodata) {	/* bytes we cannot look at (sendfile): the frames are lost */
		d->resync = 1;
		return;
	}
	p->dir = dir;
	p->paired = st->fresh && st->role_hint != ROLE_NONE;
	p->start = start;
	p->end = start + e->len;
	p->buf = e->src.buf;
	p->vec = e->src.vec;
	p->niov = e->src.iovcnt < H2_MAX_IOVS ? e->src.iovcnt : H2_MAX_IOVS;	/* frames past these: resync */
	p->seg = 0;
	p->seg_start = start;
	p->win_len = 0;
	p->chunk = 0x80000000;	/* none read: i - chunk is never below H2_IOV_CHUNK */
	/* where the previous call left off must be where this one begins */
	if (!d->resync && (d->cap_left ? d->cap_at < start : d->next + d->part_len < start))
		d->resync = 1;
	if (d->resync) {
		if (!h2_at_frame(&w, start))
			return;	/* not at a frame: wait for a call that is */
		d->resync = 0;
		d->next = start;
		d->part_len = 0;
		d->cap_left = 0;
		d->gap = 1;
		d->gen++;	/* blocks were missed: none known before means the same now */
		otb_count(&http_stats, HS_H2_RESYNC);
	}
	if (rec->h.conn_id != st->conn_id) {
		/* what stays the same for a connection: copied when this CPU's
		 * last call was another one's */
		rec->h.conn_id = st->conn_id;
		rec->h.tgid = c->tgid;
		rec->h.t = c->t;
		rec->h.tls = e->tls;
		rec->h.role_hint = st->role_hint;
		rec->h.fresh = st->fresh;
		__builtin_memcpy(rec->h.comm, c->comm, sizeof(rec->h.comm));
	}
	rec->h.ts = e->t1;
	rec->h.tid = (__u32)bpf_get_current_pid_tgid();
	rec->h.used = 0;
	rec->h.dir = dir;
	rec->h.gap = d->gap;
	bpf_loop(H2_STEPS, h2_step, &w, 0);
	/* a gap is said by the first record sent after it (a call with no
	 * frame to send keeps it for the next) */
	if (!rec->h.gap || rec->h.used)
		d->gap = 0;
	if (d->cap_left ? d->cap_at < p->end : d->next + d->part_len < p->end) {
		/* more frames than steps: the rest of the call was not seen */
		d->resync = 1;
		d->gap = 1;
		otb_count(&http_stats, HS_H2_RESYNC);
	}
	h2_flush(rec);
}

/* A read or write on an HTTP/2 connection. Not inlined: on_data's frame
 * stays HTTP/1's, and this one is only on HTTP/2's call chain. */
static __noinline void http2_on_data(struct data_ev *e, struct http_conn *c)
{
	__u64 sk = e->sk;
	struct h2_state *st = bpf_map_lookup_elem(&h2_conns, &sk);

	c->last_ns = e->t1;
	if (!st) {
		/* evicted by newer connections: start again as if joined */
		__u32 z = 0;
		struct h2_state *zero = bpf_map_lookup_elem(&h2_zero_state, &z);

		otb_count(&http_stats, HS_H2_STATE_LOST);
		if (!zero || bpf_map_update_elem(&h2_conns, &sk, zero, BPF_ANY))
			return;
		st = bpf_map_lookup_elem(&h2_conns, &sk);
		if (!st)
			return;
		st->conn_id = bpf_ktime_get_ns() * 0x9E3779B97F4A7C15ULL ^ sk;
		st->d[0].resync = st->d[1].resync = 1;
	}
	h2_walk_call(e, c, st);
}

/* Whether a connection not tracked yet starts speaking HTTP/2 with this
 * call, from its first 8 bytes: the preface, or a HEADERS frame that ends
 * its header block (a connection older than the agent). */
static __always_inline int h2_start_kind(__u64 w)
{
	const __u8 *b = (const __u8 *)&w;
	__u32 len = (__u32)b[0] << 16 | (__u32)b[1] << 8 | b[2];

	if (w == 0x5448202a20495250ULL)	/* "PRI * HT" */
		return 1;
	if (b[3] == H2_HEADERS && (b[4] & H2_END_HEADERS) && !(b[4] & ~0x2d) && !(b[5] & 0x80) && len &&
	    len <= 16384)
		return 2;
	return 0;
}

/* A new connection's first call, if it is HTTP/2: tracked from now on.
 * H2_START_NO: not HTTP/2; H2_START_WALK: the caller walks the call with
 * http2_on_data (not called from here: their frames would stack);
 * H2_START_DONE: HTTP/2, but it could not be tracked. Not inlined: its frame
 * stays out of the hooks' (see on_http1). */
enum { H2_START_NO = 0, H2_START_WALK = 1, H2_START_DONE = 2 };

static __noinline int http2_start(struct data_ev *e)
{
	int kind;
	__u32 z = 0;
	__u64 sk = e->sk;

	if (!e || !h2_enabled || !e->head_ok || !(kind = h2_start_kind(e->head8)))
		return H2_START_NO;
	if (kind == 1 && e->len < 24)
		return H2_START_NO;
	struct http_conn *zc = bpf_map_lookup_elem(&http_zero_conn, &z);
	struct h2_state *zs = bpf_map_lookup_elem(&h2_zero_state, &z);

	if (!zc || !zs)
		return H2_START_NO;
	if (bpf_map_update_elem(&h2_conns, &sk, zs, BPF_ANY) ||
	    bpf_map_update_elem(&http_conns, &sk, zc, BPF_ANY)) {
		bpf_map_delete_elem(&h2_conns, &sk);
		otb_count(&http_stats, HS_CONN_TABLE_FULL);
		return H2_START_DONE;
	}
	struct http_conn *c = bpf_map_lookup_elem(&http_conns, &sk);
	struct h2_state *st = bpf_map_lookup_elem(&h2_conns, &sk);

	if (!c || !st)
		return H2_START_DONE;
	c->proto = L7_HTTP2;
	c->tls = e->tls;
	c->tgid = bpf_get_current_pid_tgid() >> 32;
	/* the process's name, not the thread's: gRPC and Node do their I/O on
	 * threads named for the library (event_engine...) */
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	BPF_CORE_READ_STR_INTO(&c->comm, task, group_leader, comm);
	read_tuple(sk, &c->t);
	st->conn_id = bpf_ktime_get_ns() * 0x9E3779B97F4A7C15ULL ^ sk;
	if (kind == 1) {
		/* the preface: whoever writes it is the client; frames follow it */
		st->fresh = 1;
		st->role_hint = e->dir == DIR_OUT ? ROLE_CLIENT : ROLE_SERVER;
		st->d[e->dir & 1].next = 24;
	} else {
		/* joined mid-way: this call starts at a frame, the other
		 * direction's first call may not */
		st->d[(e->dir & 1) ^ 1].resync = 1;
	}
	return H2_START_WALK;
}

/* The connection ended: user space closes its streams and forgets it.
 * The record is reserved in the ring, not built in the per-CPU buffer: this
 * runs from softirq too (a reset destroys the sock), and may interrupt a
 * walk on this CPU that is using that buffer. */
static __always_inline void http2_conn_gone(__u64 sk, struct http_conn *c)
{
	struct h2_state *st = bpf_map_lookup_elem(&h2_conns, &sk);
	struct h2_rec_head *h;

	if (st) {
		/* streams still open go where user space sweeps them at the close
		 * (before the record that says it is sent) */
		struct h2_stream_key key = { .conn_id = st->conn_id };

		for (int i = 0; i < H2_SLOTS; i++) {
			key.sid = st->slots[i].sid;
			if (key.sid)
				bpf_map_update_elem(&h2_streams, &key, &st->slots[i].s, BPF_ANY);
		}
	}
	if (st && (h = bpf_ringbuf_reserve(&h2_events, sizeof(*h), 0))) {
		__builtin_memset(h, 0, sizeof(*h));
		h->conn_id = st->conn_id;
		h->ts = bpf_ktime_get_ns();
		h->tgid = c->tgid;
		h->t = c->t;
		h->tls = c->tls;
		h->role_hint = st->role_hint;
		h->fresh = st->fresh;
		h->closed = 1;
		__builtin_memcpy(h->comm, c->comm, sizeof(h->comm));
		bpf_ringbuf_submit(h, 0);
	} else if (st) {
		otb_count(&http_stats, HS_H2_RINGBUF_FULL);
	}
	bpf_map_delete_elem(&h2_conns, &sk);
}

#endif
